"""The load generator's measurements: SSE parsing, TTFT/ITL/TPOT maths, percentiles, token counts, errors and
concurrency, against scripted streams (exact times from a fake clock) and a real loopback SSE server."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.prompts import Prompt, build_prompts, prompts_digest
from bench.serve_bench import (
    LoadConfig,
    RequestResult,
    percentile,
    request_body,
    run_load,
    send_request,
    summarize,
)

PROMPT = Prompt("Summarise the following text.\n\nhello world")


class FakeClock:
    """A clock that only moves when told."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def chat_chunk(
    content: str | None = None, role: str | None = None, finish: str | None = None
) -> dict[str, Any]:
    delta: dict[str, Any] = {}
    if role:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    return {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def usage_chunk(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "choices": [],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def scripted_transport(
    clock: FakeClock, script: list[tuple[float, dict[str, Any] | str]], status: int = 200
) -> httpx.MockTransport:
    """Each request is answered with `script`: (time the frame arrives, frame), a frame being a JSON chunk or
    the literal '[DONE]'. The clock is set to a frame's time just before the frame is handed to the client."""

    def handler(request: httpx.Request) -> httpx.Response:
        async def body() -> AsyncIterator[bytes]:
            for at, frame in script:
                clock.now = at
                payload = frame if isinstance(frame, str) else json.dumps(frame)
                yield f"data: {payload}\n\n".encode()

        if status != 200:
            err = {"error": {"message": "busy", "type": "rate_limit", "param": None, "code": "queue_full"}}
            return httpx.Response(status, json=err)
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body())

    return httpx.MockTransport(handler)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def one(transport: httpx.MockTransport, clock: FakeClock, **cfg: Any) -> RequestResult:
    config = LoadConfig(base_url="http://fake/v1", model="m", **cfg)
    async with httpx.AsyncClient(transport=transport) as client:
        return await send_request(client, config, PROMPT, clock)


def test_chat_stream_timings_and_usage_are_exact() -> None:
    clock = FakeClock()
    script: list[tuple[float, dict[str, Any] | str]] = [
        (0.010, chat_chunk(role="assistant", content="")),  # role-only chunk: not a token
        (0.030, chat_chunk("Hel")),
        (0.045, chat_chunk("lo")),
        (0.075, chat_chunk("!")),
        (0.080, chat_chunk(finish="length")),
        (0.081, usage_chunk(prompt_tokens=7, completion_tokens=4)),
        (0.082, "[DONE]"),
    ]
    result = run(one(scripted_transport(clock, script), clock))
    assert result.ok and result.error is None
    assert result.ttft == pytest.approx(0.030)
    assert result.itl == pytest.approx([0.015, 0.030])
    assert result.latency == pytest.approx(0.082)
    # usage wins over the chunk count (a chunk may carry several tokens)
    assert (result.output_tokens, result.prompt_tokens, result.usage_reported) == (4, 7, True)


def test_without_usage_tokens_are_counted_from_text_chunks_completions() -> None:
    clock = FakeClock()
    script: list[tuple[float, dict[str, Any] | str]] = [
        (0.020, {"choices": [{"index": 0, "text": "a", "finish_reason": None}]}),
        (0.025, {"choices": [{"index": 0, "text": "", "finish_reason": None}]}),
        (0.040, {"choices": [{"index": 0, "text": "b", "finish_reason": "length"}]}),
        (0.041, "[DONE]"),
    ]
    result = run(one(scripted_transport(clock, script), clock, endpoint="completions"))
    assert result.ok
    assert (result.output_tokens, result.usage_reported) == (2, False)
    assert result.ttft == pytest.approx(0.020)
    assert result.itl == pytest.approx([0.020])


@pytest.mark.parametrize(
    ("script", "status", "expected"),
    [
        ([], 429, "HTTP 429"),
        ([(0.01, chat_chunk("a"))], 200, "without [DONE]"),
        (
            [(0.01, {"error": {"message": "boom", "type": "server_error"}}), (0.02, "[DONE]")],
            200,
            "error frame",
        ),
    ],
)
def test_failures_are_counted_not_raised(script: list[Any], status: int, expected: str) -> None:
    clock = FakeClock()
    result = run(one(scripted_transport(clock, script, status=status), clock))
    assert not result.ok
    assert expected in (result.error or "")


def test_summary_figures() -> None:
    results = [
        RequestResult(ok=True, latency=1.0, ttft=0.1, itl=[0.3, 0.3, 0.3], output_tokens=4),
        RequestResult(ok=True, latency=2.0, ttft=0.5, itl=[0.5, 0.5, 0.5, 0.5], output_tokens=4),
        RequestResult(ok=True, latency=0.2, ttft=0.2, itl=[], output_tokens=1),  # no TPOT for one token
        RequestResult(ok=False, error="HTTP 500: x"),
    ]
    cfg = LoadConfig(base_url="u", model="m", concurrency=2)
    s = summarize(cfg, results, duration=4.0)
    assert (s.num_requests, s.completed, s.errors, s.total_output_tokens) == (4, 3, 1, 9)
    assert s.request_throughput == pytest.approx(3 / 4.0)
    assert s.output_throughput == pytest.approx(9 / 4.0)
    assert s.ttft_p50_ms == pytest.approx(200.0)
    assert s.ttft_p99_ms == pytest.approx(np.percentile([100, 200, 500], 99))
    # TPOT: (1.0 - 0.1) / 3 = 0.3 and (2.0 - 0.5) / 3 = 0.5
    assert s.tpot_p50_ms == pytest.approx(400.0)
    assert s.itl_p50_ms == pytest.approx(500.0)
    assert s.itl_p99_ms == pytest.approx(500.0)
    assert s.error_samples == ["HTTP 500: x"]


def test_summary_of_nothing_is_nan_not_a_crash() -> None:
    s = summarize(LoadConfig(base_url="u", model="m"), [RequestResult(error="x")], duration=1.0)
    assert s.completed == 0 and s.errors == 1 and math.isnan(s.ttft_p50_ms)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False), min_size=1, max_size=50),
    st.floats(min_value=0, max_value=100),
)
def test_percentile_matches_numpy(values: list[float], q: float) -> None:
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-9, abs=1e-6)


def test_percentile_rejects_bad_q() -> None:
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def counting_transport(tokens: int, record: Callable[[int], None]) -> httpx.MockTransport:
    """Streams `tokens` one-token chunks per request, yielding to the event loop between chunks; `record` gets
    the number of requests in flight each time one starts."""
    in_flight = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight
        in_flight += 1
        record(in_flight)
        body = json.loads(request.content)

        async def stream() -> AsyncIterator[bytes]:
            nonlocal in_flight
            for _ in range(tokens):
                await asyncio.sleep(0)
                yield f"data: {json.dumps(chat_chunk('x'))}\n\n".encode()
            in_flight -= 1  # done before the last frame: the client may start its next request right after
            usage = usage_chunk(len(body["messages"][0]["content"]), tokens)
            yield f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode()

        return httpx.Response(200, content=stream())

    return httpx.MockTransport(handler)


@pytest.mark.parametrize("concurrency", [1, 3])
def test_closed_loop_bounds_concurrency_and_sends_every_request(concurrency: int) -> None:
    seen: list[int] = []
    prompts = build_prompts(4, seed=1)
    cfg = LoadConfig(base_url="http://fake/v1", model="m", concurrency=concurrency, num_requests=10)

    async def go() -> tuple[list[RequestResult], float]:
        async with httpx.AsyncClient(transport=counting_transport(5, seen.append)) as client:
            return await run_load(cfg, prompts, client)

    results, duration = run(go())
    assert len(results) == 10 and all(r.ok for r in results) and duration > 0
    assert max(seen) == concurrency  # reached, never exceeded
    # prompt i is prompts[i % 4]: the usage chunk echoes each prompt's length
    assert [r.prompt_tokens for r in results] == [len(prompts[i % 4].text) for i in range(10)]
    assert all(r.output_tokens == 5 for r in results)


def test_poisson_arrivals_send_every_request_within_the_bound() -> None:
    seen: list[int] = []
    cfg = LoadConfig(
        base_url="http://fake/v1", model="m", concurrency=2, num_requests=12, request_rate=2000.0
    )

    async def go() -> tuple[list[RequestResult], float]:
        async with httpx.AsyncClient(transport=counting_transport(3, seen.append)) as client:
            return await run_load(cfg, build_prompts(3), client)

    results, _ = run(go())
    assert len(results) == 12 and all(r.ok for r in results)
    assert max(seen) <= 2


def test_request_body_asks_for_usage_and_streams() -> None:
    chat = request_body(LoadConfig(base_url="u", model="m", max_tokens=9), PROMPT)
    assert chat["stream"] is True and chat["stream_options"] == {"include_usage": True}
    assert chat["messages"] == [{"role": "user", "content": PROMPT.text}] and chat["max_tokens"] == 9
    assert "ignore_eos" not in chat
    comp = request_body(LoadConfig(base_url="u", model="m", endpoint="completions", ignore_eos=True), PROMPT)
    assert comp["prompt"] == PROMPT.text and comp["ignore_eos"] is True


def test_prompt_set_is_fixed_by_its_seed() -> None:
    a, b, c = build_prompts(20, seed=3), build_prompts(20, seed=3), build_prompts(20, seed=4)
    assert a == b and prompts_digest(a) == prompts_digest(b) != prompts_digest(c)
    assert len({p.text for p in a}) > 10


async def _loopback_sse_server(delay: float, tokens: int) -> tuple[asyncio.Server, int]:
    """A minimal HTTP/1.1 server on 127.0.0.1 that streams `tokens` chat chunks `delay` seconds apart."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        headers = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in headers.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
        await reader.readexactly(length)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n")
        writer.write(f"data: {json.dumps(chat_chunk(role='assistant', content=''))}\n\n".encode())
        for _ in range(tokens):
            await asyncio.sleep(delay)
            writer.write(f"data: {json.dumps(chat_chunk('tok'))}\n\n".encode())
            await writer.drain()
        writer.write(f"data: {json.dumps(usage_chunk(3, tokens))}\n\ndata: [DONE]\n\n".encode())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_against_a_loopback_sse_server() -> None:
    """Real sockets, real clock: timings can only be late, never early, so lower bounds are exact."""
    delay, tokens = 0.02, 5

    async def go() -> tuple[list[RequestResult], float]:
        server, port = await _loopback_sse_server(delay, tokens)
        async with server:
            cfg = LoadConfig(base_url=f"http://127.0.0.1:{port}/v1", model="m", concurrency=2, num_requests=4)
            return await run_load(cfg, build_prompts(2), None)

    results, duration = run(go())
    s = summarize(LoadConfig(base_url="u", model="m", concurrency=2), results, duration)
    assert s.completed == 4 and s.errors == 0 and s.total_output_tokens == 4 * tokens
    assert s.ttft_p50_ms >= delay * 1000  # the role-only chunk sent at once does not count as a token
    assert s.itl_p50_ms >= delay * 1000 and s.tpot_p50_ms >= delay * 1000
    assert duration >= 2 * tokens * delay  # two waves of two requests
