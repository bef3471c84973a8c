"""End to end: Anthropic's Messages API (`/v1/messages`, `/v1/messages/count_tokens`) on the real engine,
through the official `anthropic` SDK and langchain-anthropic's `ChatAnthropic`, pinned in
requirements/serve-cpu.lock. One server, started with an API key (clients send it as `x-api-key`).

The tiny model's weights are random, so its text means nothing; what is checked is the protocol (blocks,
events, stop reasons, usage, errors) and that every forced tool call's `input` is valid for its tool's
`input_schema` (the chat endpoint's tool grammar).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import jsonschema
import pytest

from tests.e2e.serve_helpers import TIME, WEATHER, metric, scrape
from tests.support.lora import build_lora_adapter
from tests.support.server import RunningServer, start_server

MODEL = "tiny-anthropic"
ADAPTER = "anthropic-lora"
KEY = "sk-anthropic-e2e"
TOOLS: list[Any] = [
    {"name": "get_weather", "description": "Weather forecast", "input_schema": WEATHER},
    {"name": "get_time", "input_schema": TIME},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
GREEDY = {"temperature": 0}
ASK: list[Any] = [{"role": "user", "content": "What is the weather in Paris for 3 days?"}]


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("serve-anthropic")
    adapter = build_lora_adapter(tiny_model_dir, root / ADAPTER, seed=3)
    args = ["--served-model-name", MODEL, "--api-key", KEY]
    args += ["--max-loras", "1", "--max-lora-rank", "8", "--lora-modules", f"{ADAPTER}={adapter}"]
    with start_server(tiny_model_dir, *args, log_dir=root) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: RunningServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=120)


def _post(server: RunningServer, path: str, body: Any, **headers: str) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, headers={"x-api-key": KEY, **headers}, timeout=120)


def _events(text: str) -> list[tuple[str, dict[str, Any]]]:
    """(event line, parsed data) of each server-sent event."""
    out = []
    for frame in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in frame.splitlines())
        out.append((lines["event"], json.loads(lines["data"])))
    return out


def test_create_returns_a_text_message_with_usage(client: anthropic.Anthropic) -> None:
    message = client.messages.create(
        model=MODEL,
        max_tokens=12,
        system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        messages=ASK,
        extra_body={
            "temperature": 0.5,
            "top_p": 0.9,
            "top_k": 20,
        },  # sampling: not in anthropic 2.x's signature
        metadata={"user_id": "e2e"},
        extra_headers={"anthropic-beta": "prompt-caching-2024-07-31"},
    )
    assert re.fullmatch(r"msg_[0-9a-f]{24}", message.id)
    assert message.type == "message" and message.role == "assistant" and message.model == MODEL
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert [block.type for block in message.content] in (["text"], [])
    assert 1 <= message.usage.output_tokens <= 12
    assert message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0) > 5
    if message.stop_reason == "max_tokens":
        assert message.usage.output_tokens == 12


def test_stop_sequence_is_reported(client: anthropic.Anthropic) -> None:
    """A stop sequence the model is sure to write: the first characters it writes unconstrained."""
    first = client.messages.create(model=MODEL, max_tokens=8, messages=ASK, extra_body=GREEDY)
    text = first.content[0].text if first.content and first.content[0].type == "text" else ""
    if len(text.strip()) < 2:
        pytest.skip(f"the random model wrote no usable text: {text!r}")
    stop = text.strip()[:2]
    message = client.messages.create(
        model=MODEL, max_tokens=8, messages=ASK, stop_sequences=[stop], extra_body=GREEDY
    )
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", stop)


def test_stream_text_and_final_message(client: anthropic.Anthropic) -> None:
    with client.messages.stream(model=MODEL, max_tokens=10, messages=ASK, extra_body=GREEDY) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert final.content == [] or final.content[0].text == text
    assert final.stop_reason in ("end_turn", "max_tokens")
    assert final.usage.output_tokens >= 1
    whole = client.messages.create(model=MODEL, max_tokens=10, messages=ASK, extra_body=GREEDY)
    assert [b.model_dump() for b in whole.content] == [b.model_dump() for b in final.content]


def test_stream_events_in_anthropic_order(server: RunningServer) -> None:
    body = {"model": MODEL, "max_tokens": 6, "messages": ASK, "stream": True, "temperature": 0}
    reply = _post(server, "/v1/messages", body, **{"anthropic-version": "2023-06-01"})
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
    events = _events(reply.text)
    names = [name for name, _ in events]
    assert all(name == data["type"] for name, data in events)
    assert names[:2] == ["message_start", "ping"] and names[-2:] == ["message_delta", "message_stop"]
    start, delta = events[0][1], events[-2][1]
    assert start["message"]["content"] == [] and start["message"]["usage"]["input_tokens"] > 0
    assert delta["delta"]["stop_reason"] in ("end_turn", "max_tokens")
    assert 1 <= delta["usage"]["output_tokens"] <= 6
    blocks = [name for name in names if name.startswith("content_block")]
    if blocks:
        assert blocks[0] == "content_block_start" and blocks[-1] == "content_block_stop"


@pytest.mark.parametrize("stream", [False, True])
def test_forced_tool_use_validates_and_round_trips(client: anthropic.Anthropic, stream: bool) -> None:
    """`tool_choice: tool` and `any` answer with `tool_use` blocks whose `input` fits the schema; the
    `tool_result` goes back as the SDK sends it."""
    for seed, choice in enumerate([{"type": "tool", "name": "get_weather"}, {"type": "any"}]):
        request: dict[str, Any] = {
            "model": MODEL,
            "max_tokens": 80,
            "messages": ASK,
            "tools": TOOLS,
            "tool_choice": {**choice, "disable_parallel_tool_use": True},
            "extra_body": {"temperature": 0.7 + 0.1 * seed},
        }
        if stream:
            with client.messages.stream(**request) as events:
                message = events.get_final_message()
        else:
            message = client.messages.create(**request)
        assert message.stop_reason == "tool_use", message
        calls = [block for block in message.content if block.type == "tool_use"]
        assert len(calls) == 1 and re.fullmatch(r"toolu_[0-9a-f]{24}", calls[0].id)
        if choice["type"] == "tool":
            assert calls[0].name == "get_weather"
        jsonschema.validate(calls[0].input, SCHEMAS[calls[0].name])
        follow_up = client.messages.create(
            model=MODEL,
            max_tokens=8,
            tools=TOOLS,
            tool_choice={"type": "none"},
            messages=[
                *ASK,
                {"role": "assistant", "content": [b.model_dump() for b in message.content]},
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": calls[0].id, "content": "sunny, 21 C"},
                        {
                            "type": "tool_result",
                            "tool_use_id": calls[0].id,
                            "content": [{"type": "text", "text": "timeout"}],
                            "is_error": True,
                        },
                        {"type": "text", "text": "Summarise."},
                    ],
                },
            ],
        )
        assert follow_up.stop_reason in ("end_turn", "max_tokens")
        assert all(block.type == "text" for block in follow_up.content)


def test_count_tokens_matches_the_prompt(client: anthropic.Anthropic) -> None:
    counted = client.messages.count_tokens(model=MODEL, messages=ASK, system="Be brief.", tools=TOOLS)
    message = client.messages.create(model=MODEL, max_tokens=1, messages=ASK, system="Be brief.", tools=TOOLS)
    used = message.usage
    assert counted.input_tokens == used.input_tokens + (used.cache_read_input_tokens or 0)
    bare = client.messages.count_tokens(model=MODEL, messages=ASK)
    assert 0 < bare.input_tokens < counted.input_tokens


def test_prefix_cache_hits_are_reported(client: anthropic.Anthropic) -> None:
    long_ask = [{"role": "user", "content": "Tell me about the weather. " * 60}]
    first = client.messages.create(model=MODEL, max_tokens=2, messages=long_ask, extra_body=GREEDY)
    second = client.messages.create(model=MODEL, max_tokens=2, messages=long_ask, extra_body=GREEDY)
    total = first.usage.input_tokens + (first.usage.cache_read_input_tokens or 0)
    assert second.usage.input_tokens + (second.usage.cache_read_input_tokens or 0) == total
    assert (second.usage.cache_read_input_tokens or 0) > 0, second.usage


def test_errors_in_anthropic_shape(client: anthropic.Anthropic, server: RunningServer) -> None:
    with pytest.raises(anthropic.NotFoundError) as not_found:
        client.messages.create(model="no-such-model", max_tokens=4, messages=ASK)
    assert not_found.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    with pytest.raises(anthropic.BadRequestError, match="image"):
        client.messages.create(
            model=MODEL,
            max_tokens=4,
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}],
                }
            ],
        )
    with pytest.raises(anthropic.BadRequestError, match="reasoning parser"):
        client.messages.create(
            model=MODEL,
            max_tokens=2000,
            messages=ASK,
            thinking={"type": "enabled", "budget_tokens": 1024},
        )
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0).messages.create(
            model=MODEL, max_tokens=4, messages=ASK
        )
    missing = httpx.post(f"{server.url}/v1/messages", json={"model": MODEL, "messages": ASK}, timeout=30)
    assert missing.status_code == 401
    assert missing.json()["error"]["type"] == "authentication_error"
    no_max = _post(server, "/v1/messages", {"model": MODEL, "messages": ASK})
    assert no_max.status_code == 400 and no_max.json()["type"] == "error"
    assert no_max.json()["error"] == {
        "type": "invalid_request_error",
        "message": "max_tokens: Field required",
    }
    # a bearer key works too; an OpenAI route keeps OpenAI's error shape
    bearer = httpx.post(
        f"{server.url}/v1/messages/count_tokens",
        json={"model": MODEL, "messages": ASK},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=30,
    )
    assert bearer.status_code == 200 and bearer.json()["input_tokens"] > 0
    openai_shape = httpx.post(f"{server.url}/v1/chat/completions", json={}, timeout=30).json()
    assert set(openai_shape) == {"error"}


def test_metrics_label_the_endpoint(server: RunningServer, client: anthropic.Anthropic) -> None:
    client.messages.create(model=MODEL, max_tokens=2, messages=ASK)
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    assert re.search(
        r'llmstack:http_requests_total\{endpoint="/v1/messages",model="tiny-anthropic",status="200"\}', text
    )
    assert re.search(r'llmstack:generation_tokens_total\{model="tiny-anthropic"\} [1-9]', text)


def test_langchain_chat_anthropic(server: RunningServer) -> None:
    from langchain_anthropic import ChatAnthropic
    from pydantic import BaseModel, Field

    chat = ChatAnthropic(
        model_name=MODEL, base_url=server.url, api_key=KEY, max_tokens=16, temperature=0, max_retries=0
    )  # type: ignore[call-arg]
    reply = chat.invoke("Hello there")
    assert isinstance(reply.content, str | list)
    assert reply.usage_metadata is not None and reply.usage_metadata["output_tokens"] >= 1
    chunks = list(chat.stream("Hello there"))
    assert chunks and sum(len(c.text) for c in chunks) == len(reply.text)

    class GetWeather(BaseModel):
        """Weather forecast."""

        city: str = Field(max_length=12)
        days: int = Field(ge=1, le=9)

    tooled = chat.bind_tools([GetWeather], tool_choice="GetWeather")
    answer = tooled.invoke("What is the weather in Paris for 3 days?", max_tokens=80)
    assert len(answer.tool_calls) == 1 and answer.tool_calls[0]["name"] == "GetWeather"
    GetWeather.model_validate(answer.tool_calls[0]["args"])
    assert "ignoring unknown request field" not in server.log()  # langchain sends only Anthropic's fields


def test_leaving_a_stream_aborts_its_engine_request(server: RunningServer) -> None:
    """A client that hangs up mid-stream (while pings may be pending) leaves nothing running."""
    body = {"model": MODEL, "max_tokens": 400, "messages": ASK, "stream": True, "extra": "ignored"}
    with httpx.stream(
        "POST", f"{server.url}/v1/messages", json=body, headers={"x-api-key": KEY}, timeout=60
    ) as response:
        assert response.status_code == 200
        seen = [line for _, line in zip(range(8), response.iter_lines(), strict=False)]
    assert any(line == "event: message_start" for line in seen)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        rows = scrape(server.url)
        running = [
            metric(server.url, f"{p}:num_requests_{s}", samples=rows)
            for p in ("llmstack", "vllm")
            for s in ("running", "waiting")
        ]
        if not any(running):
            break
        time.sleep(0.2)
    assert not any(running), running
    assert (
        metric(server.url, "llmstack:ignored_request_fields_total", endpoint="messages", field="extra") == 1
    )


def test_model_routes_to_an_adapter_as_on_chat(client: anthropic.Anthropic, server: RunningServer) -> None:
    """`model` names an adapter as on the OpenAI routes: the same greedy text as chat completions with that
    adapter (one pipeline), and another than the base model's; metrics carry the adapter's label."""
    texts = {}
    for model in (MODEL, ADAPTER):
        message = client.messages.create(model=model, max_tokens=12, messages=ASK, extra_body=GREEDY)
        assert message.model == model
        texts[model] = "".join(b.text for b in message.content if b.type == "text")
        chat = httpx.post(
            f"{server.openai_url}/chat/completions",
            json={"model": model, "messages": ASK, "max_tokens": 12, "temperature": 0},
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=60,
        ).json()
        assert texts[model] == chat["choices"][0]["message"]["content"], (model, chat)
    assert texts[MODEL] != texts[ADAPTER]
    labels = {"endpoint": "/v1/messages", "model": ADAPTER, "status": "200"}
    assert metric(server.url, "llmstack:http_requests_total", **labels) >= 1
