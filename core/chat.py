"""Chat-template rendering, tools included.

Invariant: a conversation is rendered with the model's own template (the tokenizer's `chat_template`);
ChatML is used only for a tokenizer that ships none. A template that knows tools (it reads `tools`) gets the
tool definitions and the messages as Hugging Face's tool-use convention has them; for any other template the
conversation is rewritten first by `tool_fallback_messages` (Hermes-style `<tools>`, `<tool_call>` and
`<tool_response>` text, the format the `hermes` tool-call parser reads back), so every model can be asked to
call tools and shown their results.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from core.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ROLES = ("system", "developer", "user", "assistant", "tool")
TRAINING_ROLES = ("system", "user", "assistant")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

Message = Mapping[str, Any]

# The fallback's instructions (the system prompt of Hermes 2 Pro's function-calling format, shortened).
TOOLS_PREAMBLE = (
    "You may call one or more functions to assist with the user query. The functions you may call are "
    "described in JSON Schema inside <tools></tools>:\n<tools>\n{tools}\n</tools>\n"
    "For each function call, return a JSON object with the function's name and arguments inside "
    '<tool_call></tool_call> tags:\n<tool_call>\n{{"name": <function-name>, "arguments": <args-object>}}\n'
    "</tool_call>"
)


def validate_messages(messages: Sequence[Message], roles: Sequence[str] = TRAINING_ROLES) -> None:
    """Refuse an empty conversation, roles outside `roles` and non-string content."""
    if not messages:
        raise DataError("a conversation needs at least one message")
    for index, message in enumerate(messages):
        role = message.get("role")
        if role not in roles:
            raise DataError(f"message {index}: role must be one of {', '.join(roles)}, got {role!r}")
        content = message.get("content")
        if not isinstance(content, str) and not (content is None and message.get("tool_calls")):
            raise DataError(f"message {index}: content must be a string")


def chat_template_of(tokenizer: PreTrainedTokenizerBase) -> str:
    """The tokenizer's chat template, or ChatML if it has none."""
    template = getattr(tokenizer, "chat_template", None)
    return template if isinstance(template, str) and template else CHATML_TEMPLATE


def template_knows_tools(template: str) -> bool:
    """True if the template renders tool definitions itself (Hugging Face's convention: `tools`)."""
    return "tools" in template


def tool_call_text(call: Mapping[str, Any]) -> str:
    """One assistant tool call, `{"function": {"name", "arguments"}}`, in the fallback's text form."""
    function = call.get("function", call)
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        arguments = _json_or_text(arguments)
    payload = json.dumps({"name": function.get("name"), "arguments": arguments}, ensure_ascii=False)
    return f"<tool_call>\n{payload}\n</tool_call>"


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def tool_fallback_messages(
    messages: Sequence[Message], tools: Sequence[Mapping[str, Any]] | None
) -> list[dict]:
    """The conversation rewritten for a template that knows no tools, in the Hermes / Qwen 2.5 way:
    tool definitions appended to the system message (one is added if there is none), assistant tool calls as
    `<tool_call>` text, and each run of tool results as one user turn of `<tool_response>` blocks."""
    out: list[dict] = []
    if tools:
        preamble = TOOLS_PREAMBLE.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if messages and messages[0].get("role") == "system":
            out.append({"role": "system", "content": f"{messages[0].get('content') or ''}\n\n{preamble}"})
            messages = messages[1:]
        else:
            out.append({"role": "system", "content": preamble})
    previous_role = None
    for message in messages:
        role = message.get("role")
        if role == "assistant" and message.get("tool_calls"):
            parts = [message.get("content") or ""] + [tool_call_text(c) for c in message["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join(p for p in parts if p)})
        elif role == "tool":
            block = f"<tool_response>\n{message.get('content') or ''}\n</tool_response>"
            if previous_role == "tool":  # a run of results is one user turn
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block})
        else:
            out.append({k: v for k, v in message.items() if k in ("role", "content", "name")})
        previous_role = role
    return out


def _hf_tool_messages(messages: Sequence[Message]) -> list[dict]:
    """Messages for a tool-aware template: tool-call arguments as objects (Hugging Face's convention)."""
    out = []
    for message in messages:
        message = dict(message)
        if message.get("tool_calls"):
            calls = []
            for call in message["tool_calls"]:
                function = dict(call.get("function", {}))
                if isinstance(function.get("arguments"), str):
                    function["arguments"] = _json_or_text(function["arguments"])
                calls.append({**call, "function": function})
            message["tool_calls"] = calls
        out.append(message)
    return out


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    tools: Sequence[Mapping[str, Any]] | None = None,
    template_kwargs: Mapping[str, Any] | None = None,
    roles: Sequence[str] = ROLES,
) -> str:
    """The prompt text for `messages` under the model's chat template.

    `developer` messages are rendered as `system` (what OpenAI's newer models mean by it); with
    `continue_final_message` the last (assistant) message is left open for the model to continue."""
    validate_messages(messages, roles)
    template = chat_template_of(tokenizer)
    plain = [{**m, "role": "system"} if m.get("role") == "developer" else dict(m) for m in messages]
    uses_tools = bool(tools) or any(m.get("role") == "tool" or m.get("tool_calls") for m in plain)
    extra: dict[str, Any] = dict(template_kwargs or {})
    if uses_tools and template_knows_tools(template):
        conversation = _hf_tool_messages(plain)
        if tools:
            extra["tools"] = list(tools)
    elif uses_tools:
        conversation = tool_fallback_messages(plain, tools)
    else:
        conversation = plain
    rendered = tokenizer.apply_chat_template(
        conversation,
        chat_template=template,
        tokenize=False,
        add_generation_prompt=add_generation_prompt and not continue_final_message,
        continue_final_message=continue_final_message,
        **extra,
    )
    if not isinstance(rendered, str):
        raise DataError("the chat template did not render to text")
    return rendered
