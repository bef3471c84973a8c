"""Chat-template rendering.

Invariant: a conversation is rendered with the model's own template (the tokenizer's `chat_template`);
ChatML is used only for a tokenizer that ships none, and that fallback is the one documented default.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from core.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ROLES = ("system", "user", "assistant")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

Message = Mapping[str, str]


def validate_messages(messages: Sequence[Message]) -> None:
    """Refuse an empty conversation, unknown roles and non-string content."""
    if not messages:
        raise DataError("a conversation needs at least one message")
    for index, message in enumerate(messages):
        role = message.get("role")
        if role not in ROLES:
            raise DataError(f"message {index}: role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(message.get("content"), str):
            raise DataError(f"message {index}: content must be a string")


def chat_template_of(tokenizer: PreTrainedTokenizerBase) -> str:
    """The tokenizer's chat template, or ChatML if it has none."""
    template = getattr(tokenizer, "chat_template", None)
    return template if isinstance(template, str) and template else CHATML_TEMPLATE


def render_chat(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], *, add_generation_prompt: bool = True
) -> str:
    """The prompt text for `messages` under the model's chat template."""
    validate_messages(messages)
    rendered = tokenizer.apply_chat_template(
        [dict(m) for m in messages],
        chat_template=chat_template_of(tokenizer),
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )
    assert isinstance(rendered, str)
    return rendered
