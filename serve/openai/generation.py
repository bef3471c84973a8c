"""Shared request logic of chat and completions: sampling parameters, context-length checks, and the
metered, abortable run of one engine request.

Invariant: an engine request that has not finished when its consumer stops (client gone, error, shutdown) is
aborted in the engine; token counters get exactly the counts that go into `usage`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import anyio
from vllm import SamplingParams
from vllm.exceptions import VLLMClientError

from adapters.routing import Route
from serve import metrics
from serve.engine.protocol import ChoiceDelta, EngineOutput
from serve.errors import OpenAIError
from serve.state import ServerState


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


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


def sampling_params(
    *,
    n: int,
    max_tokens: int,
    temperature: float,
    top_p: float,
    stop: str | list[str] | None,
    seed: int | None,
    presence_penalty: float,
    frequency_penalty: float,
    logprobs: int | None,
) -> SamplingParams:
    """vLLM's sampling parameters; a combination vLLM refuses is the client's 400, never a 500."""
    try:
        return SamplingParams(
            n=n,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            stop=[stop] if isinstance(stop, str) else stop,
            seed=seed,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
            logprobs=logprobs,
        )
    except (ValueError, VLLMClientError) as err:
        raise OpenAIError(400, f"invalid sampling parameters: {err}") from None


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


@dataclass
class Accumulated:
    """A non-streamed choice, put together from its deltas."""

    text: list[str] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, delta: ChoiceDelta) -> None:
        self.text.append(delta.text)
        if delta.logprobs:
            self.logprobs.extend(delta.logprobs)
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason


async def run_request(
    state: ServerState,
    route: Route,
    request_id: str,
    prompt_token_ids: list[int],
    params: SamplingParams,
    usage: Usage,
    arrival: float,
) -> AsyncGenerator[EngineOutput, None]:
    """The engine's outputs for one prompt, recorded in the metrics and in `usage`; aborted if left early."""
    label = state.model_label(route.model)
    ttft, itl = metrics.TIME_TO_FIRST_TOKEN.labels(label), metrics.INTER_TOKEN_LATENCY.labels(label)
    finished = False
    first_token_at: float | None = None
    last_token_at = arrival
    generated = 0
    try:
        with state.router.lease(route):
            async with aclosing(
                state.engine.generate(request_id, prompt_token_ids, params, route.lora)
            ) as outputs:
                async for out in outputs:
                    new_tokens = sum(len(c.token_ids) for c in out.choices)
                    now = time.monotonic()
                    if new_tokens:
                        if first_token_at is None:
                            first_token_at = now
                            ttft.observe(now - arrival)
                        else:
                            gap = (now - last_token_at) / new_tokens
                            for _ in range(new_tokens):
                                itl.observe(gap)
                        last_token_at = now
                        generated += new_tokens
                    finished = out.finished
                    if finished:
                        usage.prompt_tokens += out.prompt_tokens
                        usage.completion_tokens += generated
                        metrics.E2E_REQUEST_LATENCY.labels(label).observe(now - arrival)
                        metrics.REQUEST_PROMPT_TOKENS.labels(label).observe(out.prompt_tokens)
                        metrics.REQUEST_GENERATION_TOKENS.labels(label).observe(generated)
                        metrics.PROMPT_TOKENS.labels(label).inc(out.prompt_tokens)
                        metrics.GENERATION_TOKENS.labels(label).inc(generated)
                    yield out
    finally:
        if not finished:
            # Shielded: when a client disconnects, the surrounding task is being cancelled.
            with anyio.CancelScope(shield=True):
                await state.engine.abort(request_id)


_JSON = json.JSONEncoder(ensure_ascii=False)  # json.dumps(..., ensure_ascii=False) builds one per call


def sse(payload: dict[str, Any]) -> str:
    return f"data: {_JSON.encode(payload)}\n\n"


SSE_DONE = "data: [DONE]\n\n"
