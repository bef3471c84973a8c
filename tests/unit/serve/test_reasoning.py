"""Reasoning (`--reasoning-parser`, vLLM's parsers): the split of an answer into reasoning and content in a
chat choice (streamed deltas and the final message agree), Messages' `thinking` blocks, tool calls read
from the answer after the reasoning only, and the start-up checks. End to end (a trained reasoning adapter
on the real engine) in tests/e2e/test_reasoning.py."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from transformers import PreTrainedTokenizerBase

from core.errors import ConfigError
from core.models import load_tokenizer
from serve.anthropic.messages.serving import MessageAnswer
from serve.engine.protocol import ChoiceDelta, EngineOutput
from serve.openai.chat.protocol import ChatCompletionRequest
from serve.openai.chat.reasoning import ReasoningSplit, check_parser_fits, check_reasoning_parser
from serve.openai.chat.serving import ChatChoice
from serve.openai.chat.tools import ToolPlan, plan_tools

PARSER = "deepseek_r1"
ANSWER = "<think>Paris is the capital.</think>Paris."
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> PreTrainedTokenizerBase:
    """The tiny tokenizer with `<think>`/`</think>` as single tokens (as reasoning models have them)."""
    tok = load_tokenizer(tiny_model_dir)
    tok.add_tokens(["<think>", "</think>"])
    return tok


def _deltas(tokenizer: PreTrainedTokenizerBase, text: str) -> list[ChoiceDelta]:
    """`text` as the engine streams it: one token per delta, the last one finishing."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = [tokenizer.decode(ids[: i + 1])[len(tokenizer.decode(ids[:i])) :] for i in range(len(ids))]
    assert "".join(pieces) == text
    last = len(ids) - 1
    return [
        ChoiceDelta(0, p, (t,), None, "stop" if i == last else None)
        for i, (p, t) in enumerate(zip(pieces, ids, strict=True))
    ]


def _state(tokenizer: PreTrainedTokenizerBase, parser: str = PARSER) -> Any:
    vllm = SimpleNamespace(reasoning_parser=parser)
    return SimpleNamespace(
        engine=SimpleNamespace(tokenizer=tokenizer),
        response_role="assistant",
        settings=SimpleNamespace(vllm=vllm),
        chat_template_kwargs={},
    )


def _chat(tokenizer: PreTrainedTokenizerBase, text: str, plan: ToolPlan, parser: str = PARSER) -> tuple:
    """(streamed deltas' bodies, final message) of one choice answering `text`."""
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "?"}]})
    frames = []
    streamed = ChatChoice(0, req, plan, _state(tokenizer, parser), "")
    whole = ChatChoice(0, req, plan, _state(tokenizer, parser), "")
    for d in _deltas(tokenizer, text):
        out = EngineOutput(1, (d,), d.finish_reason is not None)
        frames += streamed.update(d, out, True)
        whole.update(d, out, False)
    return [f["delta"] for f in frames], whole.final()["message"]


def _joined(bodies: list[dict[str, Any]], key: str) -> str:
    return "".join(b.get(key) or "" for b in bodies)


def test_chat_splits_reasoning_from_content_streamed_and_whole(tokenizer: PreTrainedTokenizerBase) -> None:
    bodies, message = _chat(tokenizer, ANSWER, ToolPlan("none"))
    assert message["reasoning_content"] == "Paris is the capital."
    assert message["content"] == "Paris."
    assert _joined(bodies, "reasoning_content") == message["reasoning_content"]
    assert _joined(bodies, "content") == message["content"]
    assert not any("<think>" in json.dumps(b) or "</think>" in json.dumps(b) for b in bodies)


def test_chat_without_a_parser_keeps_the_tags_in_the_content(tokenizer: PreTrainedTokenizerBase) -> None:
    bodies, message = _chat(tokenizer, ANSWER, ToolPlan("none"), parser="")
    assert message["content"] == ANSWER and "reasoning_content" not in message
    assert _joined(bodies, "content") == ANSWER


def test_unfinished_reasoning_has_no_content(tokenizer: PreTrainedTokenizerBase) -> None:
    bodies, message = _chat(tokenizer, "<think>Still thinking", ToolPlan("none"))
    assert message["reasoning_content"] == "Still thinking" and message["content"] is None
    assert _joined(bodies, "content") == ""


def test_tool_calls_are_read_from_the_answer_not_the_reasoning(tokenizer: PreTrainedTokenizerBase) -> None:
    req = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "?"}], "tools": TOOLS}
    )
    plan = plan_tools(req, "hermes")
    bodies, message = _chat(tokenizer, f"<think>I call the tool.</think>{CALL}", plan)
    assert message["reasoning_content"] == "I call the tool."
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather"]
    assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
    streamed = [c for b in bodies for c in b.get("tool_calls", [])]
    assert streamed and streamed[0]["function"]["name"] == "get_weather"
    # a call written inside the reasoning is thought, not called
    bodies, message = _chat(tokenizer, f"<think>{CALL}</think>No call.", plan)
    assert "tool_calls" not in message and message["content"] == "No call."
    assert CALL in message["reasoning_content"]
    assert not any(b.get("tool_calls") for b in bodies)


def test_messages_answer_has_a_thinking_block_first(tokenizer: PreTrainedTokenizerBase) -> None:
    for display, shown in (("summarized", "Paris is the capital."), ("omitted", "")):
        finals, streamed = [], []
        for streaming in (True, False):
            split = ReasoningSplit(PARSER, tokenizer, None)
            answer = MessageAnswer(ToolPlan("none"), tokenizer, split, display)
            events = []
            for d in _deltas(tokenizer, ANSWER):
                events += answer.update(d, EngineOutput(1, (d,), d.finish_reason is not None), streaming)
            finals.append(answer.final())
            if streaming:
                streamed = events
        assert finals[0] == finals[1]
        assert finals[0]["content"] == [
            {"type": "thinking", "thinking": shown, "signature": ""},
            {"type": "text", "text": "Paris."},
        ]
        starts = [e["content_block"]["type"] for e in streamed if e["type"] == "content_block_start"]
        assert starts == ["thinking", "text"]
        thought = [e["delta"] for e in streamed if e["type"] == "content_block_delta" and e["index"] == 0]
        assert "".join(d["thinking"] for d in thought) == shown
        assert all(d["type"] == "thinking_delta" for d in thought)


def test_messages_without_thinking_drop_the_reasoning(tokenizer: PreTrainedTokenizerBase) -> None:
    answer = MessageAnswer(ToolPlan("none"), tokenizer, ReasoningSplit(PARSER, tokenizer, None), None)
    events = []
    for d in _deltas(tokenizer, ANSWER):
        events += answer.update(d, EngineOutput(1, (d,), d.finish_reason is not None), True)
    assert answer.final()["content"] == [{"type": "text", "text": "Paris."}]
    assert [e["content_block"]["type"] for e in events if e["type"] == "content_block_start"] == ["text"]


def test_start_up_checks(tiny_model_dir: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    check_reasoning_parser("")
    check_reasoning_parser(PARSER)
    with pytest.raises(ConfigError, match=r"'no-such' is not one of vLLM's: .*deepseek_r1"):
        check_reasoning_parser("no-such")
    check_parser_fits(PARSER, tokenizer)
    with pytest.raises(ConfigError, match="cannot read this model's output"):
        check_parser_fits(PARSER, load_tokenizer(tiny_model_dir))  # no <think> token
