"""Text completions: one engine request per prompt (a prompt list gives `len(prompts) * n` choices, prompt i's
j-th sample at index `i * n + j`, as in OpenAI's API).

Invariant: `usage` sums token counts over all prompts; streamed prompts run one after another.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
from fastapi.responses import JSONResponse, StreamingResponse

from adapters.routing import Route
from serve import metrics
from serve.engine.protocol import TokenLogprob
from serve.errors import OpenAIError, as_openai_error, sse_error_frame
from serve.openai.completions.protocol import CompletionRequest
from serve.openai.generation import (
    SSE_DONE,
    Accumulated,
    Usage,
    check_context,
    new_id,
    run_request,
    sampling_params,
    sse,
)
from serve.state import ServerState


def _prompts(state: ServerState, prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
    tokenizer = state.engine.tokenizer
    if isinstance(prompt, str):
        return [tokenizer(prompt).input_ids]
    if not prompt:
        raise OpenAIError(400, "prompt is an empty list", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        prompts = [[int(p) for p in prompt]]  # type: ignore[arg-type]
    else:
        prompts = [tokenizer(p).input_ids if isinstance(p, str) else list(p) for p in prompt]  # type: ignore[arg-type]
    vocab = len(tokenizer)
    for ids in prompts:
        if any(not 0 <= t < vocab for t in ids):
            raise OpenAIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
    return prompts


def _logprobs(items: list[TokenLogprob] | tuple[TokenLogprob, ...], offset: int) -> dict[str, Any]:
    offsets = []
    for lp in items:
        offsets.append(offset)
        offset += len(lp.token)
    return {
        "tokens": [lp.token for lp in items],
        "token_logprobs": [lp.logprob for lp in items],
        "top_logprobs": [dict(lp.top) for lp in items],
        "text_offset": offsets,
    }


async def create_completion(
    state: ServerState, req: CompletionRequest, cleanup: list[Callable[[], None]]
) -> JSONResponse | StreamingResponse:
    """Answer one completion request; the admission slot's release also goes on `cleanup` (see chat)."""
    arrival = time.monotonic()
    route: Route = state.router.resolve(req.model)
    prompts = _prompts(state, req.prompt)
    params = []
    for ids in prompts:
        max_tokens = check_context(len(ids), req.max_tokens, state.engine.max_model_len, "prompt")
        params.append(
            sampling_params(
                n=req.n,
                max_tokens=max_tokens,
                temperature=req.temperature,
                top_p=req.top_p,
                stop=req.stop,
                seed=req.seed,
                presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty,
                logprobs=req.logprobs,
            )
        )
    slot = await state.admission.acquire()
    cleanup.append(slot.release)
    metrics.REQUEST_QUEUE_TIME.labels(state.model_label(route.model)).observe(slot.queue_time)
    request_id = new_id("cmpl")
    created = int(time.time())
    usage = Usage()
    runs = [
        run_request(state, route, f"{request_id}-{i}", ids, p, usage, arrival)
        for i, (ids, p) in enumerate(zip(prompts, params, strict=True))
    ]

    if not req.stream:
        choices = [Accumulated() for _ in range(len(prompts) * req.n)]

        async def collect(i: int) -> None:
            async for out in runs[i]:
                for d in out.choices:
                    choices[i * req.n + d.index].add(d)

        try:
            async with asyncio.TaskGroup() as group:  # one failure cancels the other prompts
                for i in range(len(runs)):
                    group.create_task(collect(i))
        except ExceptionGroup as group_error:
            raise group_error.exceptions[0] from None
        finally:
            for run in runs:
                await run.aclose()
            slot.release()
        body = {
            "id": request_id,
            "object": "text_completion",
            "created": created,
            "model": req.model,
            "choices": [
                {
                    "index": i,
                    "text": "".join(c.text),
                    "logprobs": _logprobs(c.logprobs, 0) if req.logprobs is not None else None,
                    "finish_reason": c.finish_reason,
                }
                for i, c in enumerate(choices)
            ],
            "usage": usage.as_dict(),
        }
        return JSONResponse(body)

    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def chunk(choices: list[dict[str, Any]], with_usage: dict[str, int] | None = None) -> str:
        payload: dict[str, Any] = {
            "id": request_id,
            "object": "text_completion",
            "created": created,
            "model": req.model,
            "choices": choices,
        }
        if include_usage:
            payload["usage"] = with_usage
        return sse(payload)

    async def stream() -> AsyncIterator[str]:
        offsets = [0] * (len(prompts) * req.n)
        try:
            for i, run in enumerate(runs):
                async for out in run:
                    for d in out.choices:
                        index = i * req.n + d.index
                        lp = None
                        if req.logprobs is not None and d.logprobs is not None:
                            lp = _logprobs(d.logprobs, offsets[index])
                        offsets[index] += len(d.text)
                        yield chunk(
                            [
                                {
                                    "index": index,
                                    "text": d.text,
                                    "logprobs": lp,
                                    "finish_reason": d.finish_reason,
                                }
                            ]
                        )
            if include_usage:
                yield chunk([], usage.as_dict())
        except Exception as exc:
            yield sse_error_frame(as_openai_error(exc))
        finally:
            with anyio.CancelScope(shield=True):  # the client may be gone: finish the clean-up anyway
                for run in runs:
                    await run.aclose()
            slot.release()
        yield SSE_DONE

    return StreamingResponse(stream(), media_type="text/event-stream")
