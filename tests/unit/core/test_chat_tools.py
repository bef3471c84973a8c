"""`core.chat.render_chat` with tools: a template that knows tools gets them (Hugging Face's convention),
any other template gets the documented Hermes-style fallback; developer messages render as system ones;
`continue_final_message` leaves the last message open."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from core.chat import TOOLS_PREAMBLE, render_chat
from core.models import load_tokenizer

TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
CALL = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}
CONVERSATION: list[dict[str, Any]] = [
    {"role": "user", "content": "Weather?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    {"role": "tool", "tool_call_id": "c2", "content": "warm"},
]
# A minimal template of the kind models with tool support ship: it reads `tools` and `tool_calls` itself.
TOOL_AWARE = (
    "{% if tools %}TOOLS:{{ tools | tojson }}\n{% endif %}"
    "{% for m in messages %}<{{ m['role'] }}>"
    "{% if m.get('tool_calls') %}{% for c in m['tool_calls'] %}CALL {{ c['function']['name'] }} "
    "{{ c['function']['arguments'] | tojson }}{% endfor %}{% else %}{{ m['content'] }}{% endif %}\n"
    "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture
def tokenizer(tiny_model_dir: Path) -> Any:
    return load_tokenizer(tiny_model_dir)


def test_a_tool_aware_template_gets_tools_and_parsed_arguments(tokenizer: Any) -> None:
    tokenizer.chat_template = TOOL_AWARE
    prompt = render_chat(tokenizer, CONVERSATION, tools=[TOOL])
    first_line = prompt.split("\n")[0]
    assert first_line.startswith("TOOLS:") and json.loads(first_line.removeprefix("TOOLS:")) == [TOOL]
    assert 'CALL get_weather {"city": "Rome"}' in prompt, "arguments handed over as an object"
    assert "<tool>sunny" in prompt and TOOLS_PREAMBLE[:20] not in prompt, "no fallback text"


def test_other_templates_get_the_hermes_fallback(tokenizer: Any) -> None:
    prompt = render_chat(tokenizer, CONVERSATION, tools=[TOOL])
    assert prompt.startswith("<|im_start|>system\n" + TOOLS_PREAMBLE[:40])
    assert json.dumps(TOOL) in prompt
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>' in prompt
    responses = "<tool_response>\nsunny\n</tool_response>\n<tool_response>\nwarm\n</tool_response>"
    assert f"<|im_start|>user\n{responses}<|im_end|>" in prompt, "a run of tool results is one user turn"


def test_developer_is_system_and_a_final_message_can_stay_open(tokenizer: Any) -> None:
    as_developer = render_chat(tokenizer, [{"role": "developer", "content": "Be brief."}])
    as_system = render_chat(tokenizer, [{"role": "system", "content": "Be brief."}])
    assert as_developer == as_system
    opened = render_chat(
        tokenizer,
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, I"}],
        continue_final_message=True,
    )
    assert opened.endswith("<|im_start|>assistant\nHello, I")
