"""Anthropic's Messages API, piece by piece: request translation into the chat request it means, content
block and event shaping, the error shape, and (on the fake engine) the paths a real engine cannot be made to
take on demand: a failure after the 200, pings while the engine is quiet. End to end in
tests/e2e/test_anthropic_messages.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from core.models import load_tokenizer
from serve.anthropic.errors import anthropic_error_body, anthropic_error_response
from serve.anthropic.messages import serving
from serve.anthropic.messages.protocol import CountTokensRequest, MessagesRequest
from serve.anthropic.messages.serving import MessageAnswer, check_thinking, to_chat_request
from serve.app import build_app
from serve.engine.protocol import ChoiceDelta, EngineOutput
from serve.errors import OpenAIError
from serve.openai.chat.tools import ToolPlan, plan_tools
from serve.openai.fields import check_extra_fields
from serve.settings import parse_settings
from tests.unit.serve.test_http_fake_engine import FakeEngine

KEY = "sk-anthropic-unit-key"
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOL = {"name": "get_weather", "description": "Weather", "input_schema": WEATHER}
ASK = [{"role": "user", "content": "Weather in Paris?"}]


def _request(**fields: Any) -> MessagesRequest:
    return MessagesRequest.model_validate({"model": "m", "max_tokens": 16, "messages": ASK, **fields})


# ---- request translation


def test_conversation_with_tool_round_trip_becomes_chat_messages() -> None:
    req = _request(
        system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        messages=[
            *ASK,
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                    {"type": "text", "text": "Let me look.", "citations": None},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_1",
                        "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                        "is_error": True,
                    },
                    {"type": "text", "text": "Thanks."},
                ],
            },
        ],
        tools=[TOOL],
        stop_sequences=["END"],
        temperature=0.2,
        top_k=5,
    )
    chat = to_chat_request(req)
    assert [m.for_template() for m in chat.messages] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [
                {
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "content": "sunny", "tool_call_id": "toolu_1"},
        {"role": "tool", "content": "Error: a\nb", "tool_call_id": "toolu_1"},
        {"role": "user", "content": "Thanks."},
    ]
    assert chat.tools is not None and chat.tools[0].function.parameters == WEATHER
    assert chat.tool_choice is None  # chat's default with tools: auto
    assert (chat.max_tokens, chat.stop, chat.temperature, chat.top_k, chat.top_p) == (
        16,
        ["END"],
        0.2,
        5,
        None,
    )
    assert chat.add_generation_prompt and not chat.continue_final_message


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, "auto"),
        ({"type": "any"}, "required"),
        ({"type": "none"}, "none"),
        ({"type": "tool", "name": "get_weather"}, {"type": "function", "function": {"name": "get_weather"}}),
    ],
)
def test_tool_choice_maps_to_chat(choice: dict[str, Any], expected: Any) -> None:
    chat = to_chat_request(_request(tools=[TOOL], tool_choice={**choice, "disable_parallel_tool_use": True}))
    got = chat.tool_choice if isinstance(chat.tool_choice, str) else chat.tool_choice.model_dump()  # type: ignore[union-attr]
    assert got == expected
    assert chat.parallel_tool_calls is False


def test_final_assistant_message_is_a_prefill() -> None:
    chat = to_chat_request(_request(messages=[*ASK, {"role": "assistant", "content": "It is"}]))
    assert chat.continue_final_message and not chat.add_generation_prompt
    with pytest.raises(OpenAIError, match="tool_result"):
        to_chat_request(
            _request(
                messages=[
                    *ASK,
                    {
                        "role": "assistant",
                        "content": [{"type": "tool_use", "id": "t", "name": "x", "input": {}}],
                    },
                ]
            )
        )


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "'image'"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "document"}]}
                        ],
                    }
                ]
            },
            "'document'",
        ),
        ({"system": [{"type": "image"}]}, "'image'"),
        ({"tools": [TOOL], "tool_choice": {"type": "tool", "name": "other"}}, "not in tools"),
        ({"tool_choice": {"type": "tool"}}, "exactly when"),
        ({"tools": [{**TOOL, "input_schema": {"type": "string"}}]}, "object schema"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools.0"),
        ({"thinking": {"type": "enabled", "budget_tokens": 2048}}, "less than max_tokens"),
        ({"temperature": 1.5}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
    ],
)
def test_invalid_requests_name_the_problem(fields: dict[str, Any], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        _request(**fields)


def test_field_policy_refuses_anthropic_fields_it_does_not_implement() -> None:
    with pytest.raises(OpenAIError, match="'output_config'") as info:
        check_extra_fields(_request(output_config={"effort": "low"}), "messages")
    assert info.value.param == "output_config"
    check_extra_fields(_request(some_sdk_extra=1), "messages")  # unknown elsewhere too: ignored
    with pytest.raises(OpenAIError, match="'speed'"):
        req = CountTokensRequest.model_validate({"model": "m", "messages": ASK, "speed": "fast"})
        check_extra_fields(req, "count_tokens")


def test_thinking_needs_a_reasoning_parser() -> None:
    check_thinking(_request(thinking={"type": "disabled"}), "")
    for thinking in ({"type": "enabled", "budget_tokens": 1024}, {"type": "adaptive"}):
        with pytest.raises(OpenAIError, match="reasoning parser") as info:
            check_thinking(_request(max_tokens=2048, thinking=thinking), "")
        assert info.value.param == "thinking"
        check_thinking(_request(max_tokens=2048, thinking=thinking), "deepseek_r1")


# ---- answer shaping


def _delta(text: str, finish: str | None = None, stop: str | None = None) -> ChoiceDelta:
    return ChoiceDelta(0, text, (1,), None, finish, stop)


def _out(delta: ChoiceDelta) -> EngineOutput:
    return EngineOutput(3, (delta,), delta.finish_reason is not None)


def test_text_stream_events_and_stop_sequence() -> None:
    answer = MessageAnswer(ToolPlan("none"), None)  # type: ignore[arg-type]
    events = [
        e for d in (_delta("Hel"), _delta("lo", "stop", "END")) for e in answer.update(d, _out(d), True)
    ]
    assert [e["type"] for e in events] == [
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
    ]
    assert events[0]["content_block"] == {"type": "text", "text": ""}
    assert "".join(e["delta"]["text"] for e in events[1:3]) == "Hello"
    assert answer.stop_reason(answer.streamed_calls) == ("stop_sequence", "END")
    assert answer.final() == {
        "content": [{"type": "text", "text": "Hello"}],
        "stop_reason": "stop_sequence",
        "stop_sequence": "END",
    }


def test_forced_tool_call_streams_as_input_json_deltas() -> None:
    tools = ({"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},)
    plan = ToolPlan("named", tools, "get_weather")
    answer = MessageAnswer(plan, None)  # type: ignore[arg-type]
    pieces = ['{"ci', 'ty":"Pa', 'ris"}']
    deltas = [_delta(p) for p in pieces[:-1]] + [_delta(pieces[-1], "stop")]
    events = [e for d in deltas for e in answer.update(d, _out(d), True)]
    start = events[0]
    assert start["type"] == "content_block_start" and start["index"] == 0
    assert start["content_block"]["type"] == "tool_use" and start["content_block"]["name"] == "get_weather"
    assert start["content_block"]["id"].startswith("toolu_") and start["content_block"]["input"] == {}
    partial = [e["delta"]["partial_json"] for e in events if e["type"] == "content_block_delta"]
    assert json.loads("".join(partial)) == {"city": "Paris"}
    assert events[-1] == {"type": "content_block_stop", "index": 0}
    assert answer.stop_reason(answer.streamed_calls) == ("tool_use", None)
    final = answer.final()
    assert [(b["type"], b["name"], b["input"]) for b in final["content"]] == [
        ("tool_use", "get_weather", {"city": "Paris"})
    ]
    assert final["stop_reason"] == "tool_use"


def test_auto_tool_call_found_by_the_hermes_parser_streams_as_blocks(tiny_model_dir: Path) -> None:
    """`auto`: text, then the call the server's parser reads, as a text block and a tool_use block whose
    streamed input fragments concatenate to the non-streamed `input`."""
    tokenizer = load_tokenizer(tiny_model_dir)
    plan = plan_tools(to_chat_request(_request(tools=[TOOL])), "hermes")
    text = 'Sure.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = [tokenizer.decode(ids[: i + 1])[len(tokenizer.decode(ids[:i])) :] for i in range(len(ids))]
    finals = []
    for streaming in (True, False):
        answer = MessageAnswer(plan, tokenizer)
        events = []
        for i, (piece, token) in enumerate(zip(pieces, ids, strict=True)):
            d = ChoiceDelta(0, piece, (token,), None, "stop" if i == len(ids) - 1 else None)
            events += answer.update(d, _out(d), streaming)
        finals.append(answer.final())
        if streaming:
            starts = [e["content_block"]["type"] for e in events if e["type"] == "content_block_start"]
            assert starts == ["text", "tool_use"]
            text_out = "".join(
                e["delta"]["text"] for e in events if e["type"] == "content_block_delta" and e["index"] == 0
            )
            partial = "".join(
                e["delta"]["partial_json"]
                for e in events
                if e["type"] == "content_block_delta" and e["index"] == 1
            )
            assert (text_out, json.loads(partial)) == ("Sure.", {"city": "Paris"})
            assert answer.stop_reason(answer.streamed_calls) == ("tool_use", None)
    for final in finals:
        assert [(b["type"], b.get("text"), b.get("input")) for b in final["content"]] == [
            ("text", "Sure.", None),
            ("tool_use", None, {"city": "Paris"}),
        ]
        assert final["stop_reason"] == "tool_use"


def test_truncated_answer_is_max_tokens() -> None:
    plan = ToolPlan("named", ({"type": "function", "function": {"name": "f"}},), "f")
    answer = MessageAnswer(plan, None)  # type: ignore[arg-type]
    d = _delta('{"a', "length")
    answer.update(d, _out(d), False)
    assert answer.final() == {
        "content": [{"type": "text", "text": '{"a'}],
        "stop_reason": "max_tokens",
        "stop_sequence": None,
    }


# ---- errors


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (413, "request_too_large"),
        (429, "rate_limit_error"),
        (500, "api_error"),
        (503, "overloaded_error"),
    ],
)
def test_error_shape_by_status(status: int, kind: str) -> None:
    body = anthropic_error_body(OpenAIError(status, "went wrong", param="messages.0"))
    assert body == {"type": "error", "error": {"type": kind, "message": "messages.0: went wrong"}}


def test_error_response_keeps_status_and_headers() -> None:
    response = anthropic_error_response(OpenAIError(429, "queue full", headers={"Retry-After": "1"}))
    assert response.status_code == 429 and response.headers["retry-after"] == "1"
    unexpected = anthropic_error_response(RuntimeError("boom"))
    assert unexpected.status_code == 500
    assert json.loads(unexpected.body)["error"]["type"] == "api_error"


# ---- HTTP, on the fake engine


class SlowEngine(FakeEngine):
    """The fake engine with a pause before each output after the first."""

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: Any, lora: Any = None
    ) -> AsyncGenerator[EngineOutput, None]:
        first = True
        async for out in super().generate(request_id, prompt_token_ids, params, lora):
            if not first:
                await asyncio.sleep(0.15)
            first = False
            yield out


@pytest.fixture
def engine(tiny_model_dir: Path) -> FakeEngine:
    return SlowEngine(load_tokenizer(tiny_model_dir))


@pytest.fixture
def client(engine: FakeEngine) -> Iterator[TestClient]:
    flags = ["--model", "/models/fake", "--served-model-name", "fake", "--max-request-body-bytes", "2048"]
    settings = parse_settings([*flags, "--api-key", KEY])
    with TestClient(build_app(settings, engine), raise_server_exceptions=False) as test_client:
        yield test_client


def _events(text: str) -> list[dict[str, Any]]:
    frames = [dict(line.split(": ", 1) for line in f.splitlines()) for f in text.strip().split("\n\n")]
    assert all(json.loads(f["data"])["type"] == f["event"] for f in frames)
    return [json.loads(f["data"]) for f in frames]


def _post(client: TestClient, body: dict[str, Any], path: str = "/v1/messages", **headers: str) -> Any:
    return client.post(path, json=body, headers={"x-api-key": KEY, **headers})


def test_keys_as_x_api_key_or_bearer(client: TestClient) -> None:
    body = {"model": "fake", "messages": ASK}
    assert _post(client, body, "/v1/messages/count_tokens").status_code == 200
    bearer = client.post("/v1/messages/count_tokens", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert bearer.status_code == 200 and bearer.json()["input_tokens"] > 0
    missing = client.post("/v1/messages/count_tokens", json=body)
    assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"
    assert "x-api-key" in missing.json()["error"]["message"]
    wrong = client.post("/v1/messages", json=body, headers={"x-api-key": "nope"})
    assert wrong.status_code == 401 and wrong.json()["type"] == "error"
    # x-api-key is the Messages API's convention only
    assert client.post("/v1/chat/completions", json={}, headers={"x-api-key": KEY}).status_code == 401


def test_pings_while_the_engine_is_quiet(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serving, "PING_INTERVAL_S", 0.05)
    reply = _post(client, {"model": "fake", "max_tokens": 3, "stream": True, "messages": ASK})
    types = [e["type"] for e in _events(reply.text)]
    assert types[:2] == ["message_start", "ping"] and types[-2:] == ["message_delta", "message_stop"]
    assert types.count("ping") >= 3  # one at the start, at least one in each 0.15 s gap
    assert [t for t in types if t != "ping"] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]


def test_failure_after_the_200_is_an_error_event(client: TestClient, engine: FakeEngine) -> None:
    engine.fail_after = 2
    reply = _post(client, {"model": "fake", "max_tokens": 5, "stream": True, "messages": ASK})
    assert reply.status_code == 200
    events = _events(reply.text)
    assert events[-1] == {
        "type": "error",
        "error": {"type": "api_error", "message": "internal error: RuntimeError"},
    }
    assert "message_stop" not in [e["type"] for e in events]
    assert engine.aborted  # the engine request was aborted


def test_whole_message_and_middleware_errors_in_anthropic_shape(client: TestClient) -> None:
    reply = _post(client, {"model": "fake", "max_tokens": 2, "messages": ASK})
    body = reply.json()
    assert body["type"] == "message" and body["id"].startswith("msg_") and body["model"] == "fake"
    assert body["content"] == [{"type": "text", "text": "xx"}] and body["stop_reason"] == "max_tokens"
    assert body["usage"]["output_tokens"] == 2 and body["usage"]["cache_read_input_tokens"] == 0
    too_large = client.post("/v1/messages", content=b"x" * 4096, headers={"x-api-key": KEY})
    assert too_large.status_code == 413 and too_large.json()["error"]["type"] == "request_too_large"
    openai_413 = client.post("/v1/chat/completions", content=b"x" * 4096)
    assert openai_413.status_code == 413 and "type" not in openai_413.json()
    wrong_method = client.get("/v1/messages")
    assert wrong_method.status_code == 405 and wrong_method.json()["type"] == "error"
    assert client.get("/v1/chat/completions").json()["error"]["type"] == "invalid_request_error"


class HeldEngine(FakeEngine):
    """The fake engine that holds each request after its first output until `release` is set."""

    def __init__(self, tokenizer: Any) -> None:
        super().__init__(tokenizer)
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: Any, lora: Any = None
    ) -> AsyncGenerator[EngineOutput, None]:
        self.started.set()
        await self.release.wait()
        async for out in super().generate(request_id, prompt_token_ids, params, lora):
            yield out


def test_admission_429_in_anthropic_shape(tiny_model_dir: Path) -> None:
    """With one engine slot and no queue, a second request while the first holds the slot is Anthropic's
    `rate_limit_error` with Retry-After; the slot is free again once the first is answered."""
    import httpx

    engine = HeldEngine(load_tokenizer(tiny_model_dir))
    flags = ["--model", "/models/fake", "--served-model-name", "fake"]
    settings = parse_settings([*flags, "--max-concurrent-requests", "1", "--max-queued-requests", "0"])
    app = build_app(settings, engine)
    body = {"model": "fake", "max_tokens": 3, "messages": ASK}

    async def scenario() -> tuple[httpx.Response, httpx.Response, int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            held = asyncio.ensure_future(client.post("/v1/messages", json=body))
            await asyncio.wait_for(engine.started.wait(), 10)
            refused = await client.post("/v1/messages", json=body)
            engine.release.set()
            first = await held
            after = await client.post("/v1/messages", json=body)
        return refused, first, after.status_code

    refused, first, after = asyncio.run(scenario())
    assert first.status_code == 200 and first.json()["type"] == "message"
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert after == 200
