"""The one generation pipeline behind chat, completions, TGI's API and Anthropic's Messages API: prepare, run,
then collect or stream.

- prepare (each endpoint): resolve the model, build the prompt token ids, check the context, and let the
  request model build its `SamplingParams`; the result is a `Generation`, nothing started yet.
- run (`Generation.outputs`): one engine request per prompt, merged; metered (TTFT, inter-token latency,
  token counters) and aborted in the engine whenever its consumer stops early (client gone, error).
- collect (`collect`) for a non-streamed answer, or stream (`openai_sse`) as OpenAI's SSE chunks. Each
  endpoint only supplies a `Choice` per output sequence: how its deltas become the endpoint's choices.

Invariants: `usage.prompt_tokens` is fixed at prepare time and `usage.completion_tokens` counts exactly the
tokens the engine produced for the answer, so `usage` and the token counters agree; an engine request that
has not finished when its consumer stops is aborted; a stream that fails after its 200 ends with an
OpenAI error frame and `[DONE]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import anyio
import msgspec
from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from vllm import SamplingParams
from vllm.exceptions import VLLMClientError
from vllm.utils.async_utils import merge_async_iterators

from adapters.routing import Route
from serve import metrics
from serve.admission import Slot
from serve.engine.protocol import ChoiceDelta, EngineOutput
from serve.errors import OpenAIError, as_openai_error
from serve.state import ServerState

T = TypeVar("T")
JSON = msgspec.json.Encoder()  # several times faster than json.dumps for the per-token chunks
SSE_DONE = b"data: [DONE]\n\n"
CLIENT_CLOSED = 499  # nginx's status for "client closed the request": only ever seen in metrics


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def json_response(body: Any, status: int = 200) -> Response:
    return Response(JSON.encode(body), status_code=status, media_type="application/json")


def sse(payload: Any) -> bytes:
    return b"data: " + JSON.encode(payload) + b"\n\n"


def check_context(prompt_len: int, max_tokens: int | None, max_model_len: int, param: str) -> int:
    """The number of tokens to generate; 400 if the prompt (plus `max_tokens`) does not fit the context."""
    if prompt_len == 0:
        raise OpenAIError(400, "the prompt is empty", param=param)
    if prompt_len >= max_model_len:
        raise OpenAIError(
            400,
            f"the prompt has {prompt_len} tokens; this model's context is {max_model_len} tokens",
            param=param,
            code="context_length_exceeded",
        )
    room = max_model_len - prompt_len
    if max_tokens is None:
        return room
    if max_tokens > room:
        raise OpenAIError(
            400,
            f"max_tokens={max_tokens} plus the prompt's {prompt_len} tokens exceeds this model's context of "
            f"{max_model_len} tokens",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return max_tokens


@dataclass
class Usage:
    """Token counts of a generation; `cached_prompt_tokens`: prompt tokens the engine's prefix cache held
    (part of `prompt_tokens`; 0 where the engine does not say)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    with_details: bool = False  # vLLM's --enable-prompt-tokens-details: `prompt_tokens_details` in as_dict

    def as_dict(self) -> dict[str, Any]:
        usage: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }
        if self.with_details:
            usage["prompt_tokens_details"] = {"cached_tokens": self.cached_prompt_tokens}
        return usage


@dataclass
class EnginePrompt:
    """One engine request of a generation. `scoring_only`: the one token generated is not part of the
    answer (OpenAI's `max_tokens: 0` prompt scoring; vLLM always generates at least one token)."""

    token_ids: list[int]
    params: SamplingParams
    text: str | None = None
    scoring_only: bool = False


@dataclass
class Generation:
    """A validated request, ready to run: its prompts (one engine request each) and where they go."""

    state: ServerState
    route: Route
    prompts: list[EnginePrompt]
    n: int
    request_id: str
    arrival: float
    stream: bool
    usage: Usage = field(default_factory=Usage)
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.usage.prompt_tokens = sum(len(p.token_ids) for p in self.prompts)
        self.usage.with_details = self.state.prompt_tokens_details
        self.label = self.state.model_label(self.route.model)

    def outputs(self) -> AsyncGenerator[tuple[int, EngineOutput], None]:
        """(prompt index, engine output) of every prompt, as they come; closing it aborts what is left."""
        if len(self.prompts) == 1:  # the common case: no merging layer between the engine and the stream
            return _run_one(self, self.request_id, self.prompts[0], 0)
        runs = [_run_one(self, f"{self.request_id}-{i}", p, i) for i, p in enumerate(self.prompts)]
        return _merged(runs)


async def _merged(
    runs: list[AsyncGenerator[tuple[int, EngineOutput], None]],
) -> AsyncGenerator[tuple[int, EngineOutput], None]:
    async with aclosing(merge_async_iterators(*runs)) as merged:  # closing this closes (aborts) every run
        async for _, item in merged:
            yield item


async def _run_one(
    gen: Generation, request_id: str, prompt: EnginePrompt, index: int
) -> AsyncGenerator[tuple[int, EngineOutput], None]:
    """One engine request, recorded in the metrics and in `gen.usage`; aborted if left early."""
    state, label = gen.state, gen.label
    ttft, itl = metrics.TIME_TO_FIRST_TOKEN.labels(label), metrics.INTER_TOKEN_LATENCY.labels(label)
    finished = False
    first_token_at: float | None = None
    last_token_at = gen.arrival
    generated = 0
    cached_counted = False
    try:
        with state.router.lease(gen.route):
            engine_start = time.monotonic()
            engine_outputs = state.engine.generate(
                request_id, prompt.token_ids, prompt.params, gen.route.lora
            )
            if state.request_log is not None:  # vLLM's --enable-log-requests
                engine_outputs = state.request_log.logged(
                    request_id,
                    (prompt.text, prompt.token_ids),
                    prompt.params,
                    gen.route.lora,
                    engine_outputs,
                    gen.stream,
                )
            async with aclosing(engine_outputs) as outputs:
                async for out in outputs:
                    now = time.monotonic()
                    new_tokens = 0 if prompt.scoring_only else sum(len(c.token_ids) for c in out.choices)
                    if out.timing is not None and first_token_at is None:
                        # One final output (not streamed): the engine's own token timing.
                        # The engine's clocks are not ours: bounded so that TTFT + decode <= e2e here too.
                        first_token_at = now
                        elapsed = now - gen.arrival
                        to_first = min(engine_start - gen.arrival + out.timing.first_token_latency, elapsed)
                        ttft.observe(to_first)
                        if new_tokens > 1:
                            decode = min(out.timing.decode_seconds, elapsed - to_first)
                            gap = decode / (new_tokens - 1)
                            for _ in range(new_tokens - 1):
                                itl.observe(gap)
                    elif new_tokens:
                        if first_token_at is None:
                            first_token_at = now
                            ttft.observe(now - gen.arrival)
                        else:
                            gap = (now - last_token_at) / new_tokens
                            for _ in range(new_tokens):
                                itl.observe(gap)
                        last_token_at = now
                    generated += new_tokens
                    gen.usage.completion_tokens += new_tokens
                    if not cached_counted and out.cached_tokens is not None:
                        cached_counted = True  # known from the first output on (the prefill's)
                        gen.usage.cached_prompt_tokens += out.cached_tokens
                    finished = out.finished
                    if finished:
                        metrics.E2E_REQUEST_LATENCY.labels(label).observe(now - gen.arrival)
                        metrics.REQUEST_PROMPT_TOKENS.labels(label).observe(out.prompt_tokens)
                        metrics.REQUEST_GENERATION_TOKENS.labels(label).observe(generated)
                        metrics.PROMPT_TOKENS.labels(label).inc(out.prompt_tokens)
                        metrics.GENERATION_TOKENS.labels(label).inc(generated)
                    yield index, out
    except VLLMClientError as err:
        raise OpenAIError(400, str(err), param=getattr(err, "parameter", None)) from None
    except ValueError as err:
        if first_token_at is None and not finished:
            # vLLM validates a request when it is added (e.g. a grammar that does not compile): the
            # client's 400, not a server error.
            raise OpenAIError(400, f"the engine refused the request: {err}") from None
        raise
    finally:
        if not finished:
            # Shielded: when a client disconnects, the surrounding task is being cancelled.
            with anyio.CancelScope(shield=True):
                await state.engine.abort(request_id)


class Choice(Protocol):
    """One output sequence of a generation, as an endpoint shapes it."""

    def start(self) -> list[dict[str, Any]]:
        """Stream choice objects to send before the first output (chat's role delta)."""
        ...

    def update(self, delta: ChoiceDelta, output: EngineOutput, streaming: bool) -> list[dict[str, Any]]:
        """Take one delta; the stream choice objects it makes (none when not streaming)."""
        ...

    def final(self) -> dict[str, Any]:
        """The non-streamed choice object (after the last delta)."""
        ...


async def collect(gen: Generation, choices: Sequence[Choice], slot: Slot) -> None:
    """Run `gen` to the end, feeding every delta to its choice (`prompt index * n + delta.index`)."""
    try:
        async with aclosing(gen.outputs()) as outputs:
            async for i, out in outputs:
                for delta in out.choices:
                    choices[i * gen.n + delta.index].update(delta, out, False)
    finally:
        slot.release()


def openai_sse(
    gen: Generation,
    choices: Sequence[Choice],
    slot: Slot,
    envelope: dict[str, Any],
    *,
    include_usage: bool,
    continuous_usage: bool,
    outputs: PrimedOutputs,
) -> AsyncIterator[bytes]:
    """OpenAI's SSE stream of `gen` (`outputs` from `start_stream`): `envelope` (id, object, created,
    model) around each chunk's choices, a usage chunk at the end with `include_usage`, `[DONE]` last."""

    def frame(payload_choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> bytes:
        payload = {**envelope, "choices": payload_choices}
        if include_usage:
            payload["usage"] = (
                usage if usage is not None else (gen.usage.as_dict() if continuous_usage else None)
            )
        return sse(payload)

    async def stream() -> AsyncIterator[bytes]:
        try:
            for choice in choices:
                for started in choice.start():
                    yield frame([started])
            async for i, out in outputs:
                for delta in out.choices:
                    for payload in choices[i * gen.n + delta.index].update(delta, out, True):
                        yield frame([payload])
            if include_usage:
                yield frame([], gen.usage.as_dict())
        except Exception as exc:
            yield sse(as_openai_error(exc).body())
        finally:
            with anyio.CancelScope(shield=True):  # the client may be gone: finish the clean-up anyway
                await outputs.aclose()
            slot.release()
        yield SSE_DONE

    return stream()


class PrimedOutputs:
    """A generation's outputs whose first item was already awaited: iterates that item, then the rest.

    (A small class rather than a wrapping async generator: no extra generator frame per token.)"""

    def __init__(
        self, outputs: AsyncGenerator[tuple[int, EngineOutput], None], first: tuple[int, EngineOutput] | None
    ):
        self._outputs = outputs
        self._first = first
        self._done = first is None

    def __aiter__(self) -> PrimedOutputs:
        return self

    async def __anext__(self) -> tuple[int, EngineOutput]:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        if self._done:
            raise StopAsyncIteration
        return await self._outputs.__anext__()

    async def aclose(self) -> None:
        await self._outputs.aclose()


async def start_stream(gen: Generation) -> PrimedOutputs:
    """Start `gen`'s engine requests and wait for the first output, so that a request the engine refuses
    is still an HTTP error (before the 200) rather than an error frame."""
    outputs = gen.outputs()
    try:
        first = await outputs.__anext__()
    except StopAsyncIteration:
        return PrimedOutputs(outputs, None)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await outputs.aclose()
        raise
    return PrimedOutputs(outputs, first)


KEEP_ALIVE_FRAME = b": keep-alive\n\n"


async def with_keep_alive(frames: AsyncIterator[bytes], interval: float) -> AsyncGenerator[bytes, None]:
    """`frames`, with an SSE comment line sent whenever none came for `interval` seconds (vLLM's
    `--sse-keep-alive-interval`: keeps proxies with read timeouts from closing a queued or slow stream).
    Closing this closes `frames` (and so aborts its engine requests)."""
    pending: asyncio.Future[bytes] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(frames.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield KEEP_ALIVE_FRAME
                continue
            try:
                frame = pending.result()
            except StopAsyncIteration:
                return
            pending = None
            yield frame
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await pending
        close = getattr(frames, "aclose", None)
        if close is not None:
            await close()


def streaming_response(body: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def cancel_on_disconnect(request: Request, work: Awaitable[Response]) -> Response:
    """`work`'s response, unless the client disconnects first: then `work` is cancelled (its engine
    requests are aborted by their own clean-up) and a response nobody will read is returned.

    Starlette cancels a streaming response's generator on disconnect, but not an ordinary handler; vLLM's
    server does the same as this with its `with_cancellation` decorator."""
    task: asyncio.Future[Response] = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                task.cancel()
                return

    watcher = asyncio.ensure_future(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if task.cancelled() and not _current_task_cancelling():
            return Response(status_code=CLIENT_CLOSED)
        raise
    finally:
        watcher.cancel()


def _current_task_cancelling() -> bool:
    current = asyncio.current_task()
    return bool(current is not None and current.cancelling())


async def admitted(state: ServerState, request: Request, gen: Generation) -> Slot:
    """An admission slot for `gen` (429 when the queue is full); released when the response is over."""
    slot = await state.admission.acquire()
    request.state.cleanup.append(slot.release)
    metrics.REQUEST_QUEUE_TIME.labels(gen.label).observe(slot.queue_time)
    return slot


async def respond(
    request: Request,
    gen: Generation,
    choices: Sequence[Choice],
    envelope: dict[str, Any],
    body: Callable[[], dict[str, Any]],
    *,
    include_usage: bool = False,
    continuous_usage: bool = False,
) -> Response:
    """The OpenAI response for `gen`: SSE chunks if it streams, else `body()` once every choice is done."""
    slot = await admitted(gen.state, request, gen)
    if gen.stream:
        try:
            outputs = await start_stream(gen)
        except BaseException:
            slot.release()
            raise
        frames = openai_sse(
            gen,
            choices,
            slot,
            envelope,
            include_usage=include_usage or gen.state.force_include_usage,
            continuous_usage=continuous_usage,
            outputs=outputs,
        )
        interval = gen.state.sse_keep_alive_interval
        return streaming_response(with_keep_alive(frames, interval) if interval > 0 else frames)

    async def answer() -> Response:
        await collect(gen, choices, slot)
        return json_response(body())

    return await cancel_on_disconnect(request, answer())
