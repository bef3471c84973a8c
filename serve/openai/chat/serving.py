"""Chat completions: render the conversation with the model's chat template, run it, answer in OpenAI format.

Invariant: `usage` comes from token counts (prompt ids we built, token ids the engine produced).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
from fastapi.responses import JSONResponse, StreamingResponse

from core.chat import render_chat
from serve import metrics
from serve.engine.protocol import TokenLogprob
from serve.errors import as_openai_error, sse_error_frame
from serve.openai.chat.protocol import ChatCompletionRequest
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


def _logprobs(items: list[TokenLogprob] | tuple[TokenLogprob, ...]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": lp.token,
                "logprob": lp.logprob,
                "bytes": list(lp.token.encode()),
                "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in lp.top],
            }
            for lp in items
        ]
    }


async def create_chat_completion(
    state: ServerState, req: ChatCompletionRequest, cleanup: list[Callable[[], None]]
) -> JSONResponse | StreamingResponse:
    """Answer one chat request. The admission slot's release is also put on `cleanup`, which the HTTP layer
    runs once the response is over (whether or not a stream ever started)."""
    arrival = time.monotonic()
    route = state.router.resolve(req.model)
    tokenizer = state.engine.tokenizer
    prompt = render_chat(tokenizer, [{"role": m.role, "content": m.text()} for m in req.messages])
    prompt_ids: list[int] = tokenizer(prompt, add_special_tokens=False).input_ids
    max_tokens = check_context(
        len(prompt_ids), req.requested_max_tokens(), state.engine.max_model_len, "messages"
    )
    params = sampling_params(
        n=req.n,
        max_tokens=max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        stop=req.stop,
        seed=req.seed,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        logprobs=req.num_logprobs(),
    )
    slot = await state.admission.acquire()
    cleanup.append(slot.release)
    metrics.REQUEST_QUEUE_TIME.labels(state.model_label(route.model)).observe(slot.queue_time)
    request_id = new_id("chatcmpl")
    created = int(time.time())
    usage = Usage()
    outputs = run_request(state, route, request_id, prompt_ids, params, usage, arrival)

    if not req.stream:
        try:
            choices = [Accumulated() for _ in range(req.n)]
            async for out in outputs:
                for delta in out.choices:
                    choices[delta.index].add(delta)
        finally:
            slot.release()
        body = {
            "id": request_id,
            "object": "chat.completion",
            "created": created,
            "model": req.model,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": "".join(c.text)},
                    "logprobs": _logprobs(c.logprobs) if req.logprobs else None,
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
            "object": "chat.completion.chunk",
            "created": created,
            "model": req.model,
            "choices": choices,
        }
        if include_usage:
            payload["usage"] = with_usage
        return sse(payload)

    async def stream() -> AsyncIterator[str]:
        try:
            for i in range(req.n):
                delta = {"role": "assistant", "content": ""}
                yield chunk([{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}])
            async for out in outputs:
                for d in out.choices:
                    if d.text or d.token_ids:
                        lp = _logprobs(d.logprobs) if req.logprobs and d.logprobs is not None else None
                        yield chunk(
                            [
                                {
                                    "index": d.index,
                                    "delta": {"content": d.text},
                                    "logprobs": lp,
                                    "finish_reason": None,
                                }
                            ]
                        )
                    if d.finish_reason is not None:
                        yield chunk(
                            [
                                {
                                    "index": d.index,
                                    "delta": {},
                                    "logprobs": None,
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
                await outputs.aclose()
            slot.release()
        yield SSE_DONE

    return StreamingResponse(stream(), media_type="text/event-stream")
