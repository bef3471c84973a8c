"""TGI's generate API on the shared pipeline (serve/openai/pipeline.py): a TGI request is prepared into the
same `Generation` as an OpenAI one (same admission, metrics, adapters, abort on disconnect), and only the
answer's shape is TGI's: `generated_text` and `details`, or one stream event per token.

Invariants: `adapter_id` routes through the same adapter registry as an OpenAI request's `model`; every
error is TGI's `{"error", "error_type"}` (validation problems are 422, as TGI answers them).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import Response
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

from serve.engine.protocol import ChoiceDelta, EngineOutput, TokenLogprob
from serve.errors import OpenAIError, as_openai_error
from serve.openai.pipeline import (
    EnginePrompt,
    Generation,
    admitted,
    cancel_on_disconnect,
    check_context,
    collect,
    json_response,
    new_id,
    sse,
    start_stream,
    streaming_response,
)
from serve.openai.protocol import check_json_schema, compact_json, make_sampling_params
from serve.state import ServerState
from serve.tgi.protocol import GenerateRequest, Grammar, Parameters

DEFAULT_MAX_NEW_TOKENS = 100  # TGI's default when `max_new_tokens` is not given
# OpenAI-style statuses of our errors, as TGI reports them: (status, error_type).
TGI_ERRORS = {
    400: (422, "validation"),
    404: (422, "validation"),
    413: (413, "validation"),
    429: (429, "overloaded"),
    503: (503, "unhealthy"),
}


def tgi_error(err: OpenAIError) -> Response:
    """`err` as TGI answers errors: `{"error", "error_type"}` with TGI's status (headers kept)."""
    status, kind = TGI_ERRORS.get(
        err.status, (err.status, "generation" if err.status >= 500 else "validation")
    )
    response = json_response({"error": err.message, "error_type": kind}, status=status)
    response.headers.update(err.headers)
    return response


def _constraint(grammar: Grammar | None) -> StructuredOutputsParams | None:
    if grammar is None:
        return None
    if grammar.type == "regex":
        if not isinstance(grammar.value, str):
            raise OpenAIError(400, "grammar: a regex grammar's value is a string", param="grammar")
        return StructuredOutputsParams(regex=grammar.value)
    return compact_json(check_json_schema(grammar.value, "grammar.value"))


def _finish_reason(delta: ChoiceDelta) -> str:
    if delta.finish_reason == "length":
        return "length"
    return "stop_sequence" if isinstance(delta.stop_reason, str) else "eos_token"


class TGIAnswer:
    """The one sequence of a TGI request, token by token (a `serve.openai.pipeline.Choice`)."""

    def __init__(
        self, params: Parameters, special_ids: frozenset[int], prompt_text: str, first_token: tuple[int, str]
    ) -> None:
        self._params = params
        self._first_token = first_token
        self._special = special_ids
        self._prompt_text = prompt_text
        self.text: list[str] = []
        self.tokens: list[dict[str, Any]] = []
        self.top_tokens: list[list[dict[str, Any]]] = []
        self.prefill: list[dict[str, Any]] = []
        self.finish_reason: str | None = None

    def _token(self, token_id: int, text: str, logprob: float | None) -> dict[str, Any]:
        return {"id": token_id, "text": text, "logprob": logprob, "special": token_id in self._special}

    def start(self) -> list[dict[str, Any]]:
        return []

    def update(self, delta: ChoiceDelta, output: EngineOutput, streaming: bool) -> list[dict[str, Any]]:
        if output.prompt_logprobs is not None:
            first_id, first_text = self._first_token  # nothing predicts the first token: no logprob
            self.prefill = [
                {"id": first_id, "text": first_text, "logprob": None}
                if lp is None
                else {"id": lp.token_id, "text": lp.token, "logprob": lp.logprob}
                for lp in output.prompt_logprobs
            ]
        self.text.append(delta.text)
        new: list[dict[str, Any]] = []
        items: tuple[TokenLogprob, ...] = delta.logprobs or ()
        for lp in items:
            token = self._token(lp.token_id, lp.token, lp.logprob)
            self.tokens.append(token)
            tops = [self._token(tid, text, value) for tid, text, value in lp.top]
            self.top_tokens.append(tops)
            new.append(
                {
                    "index": len(self.tokens),
                    "token": token,
                    "top_tokens": tops,
                    "generated_text": None,
                    "details": None,
                }
            )
        if delta.finish_reason is not None:
            self.finish_reason = _finish_reason(delta)
        return new if streaming else []

    def generated_text(self) -> str:
        text = "".join(self.text)
        return self._prompt_text + text if self._params.return_full_text else text

    def details(self, seed: int | None) -> dict[str, Any]:
        details: dict[str, Any] = {
            "finish_reason": self.finish_reason,
            "generated_tokens": len(self.tokens),
            "seed": seed,
            "prefill": self.prefill,
            "tokens": self.tokens,
            "best_of_sequences": None,
        }
        if self._params.top_n_tokens:
            details["top_tokens"] = self.top_tokens
        return details

    def final(self) -> dict[str, Any]:
        return {"generated_text": self.generated_text()}


def prepare(state: ServerState, req: GenerateRequest, stream: bool, arrival: float) -> Generation:
    """A TGI request as a `Generation` (nothing started)."""
    p = req.parameters
    route = state.router.resolve(p.adapter_id or state.router.base_name)
    ids = state.encode(req.inputs, add_special_tokens=True)
    if p.truncate is not None:
        ids = ids[-p.truncate :]
    max_tokens = check_context(len(ids), p.max_new_tokens, state.engine.max_model_len, "inputs")
    if p.max_new_tokens is None:
        max_tokens = min(DEFAULT_MAX_NEW_TOKENS, max_tokens)
    sampling = p.samples()
    params = make_sampling_params(
        n=1,
        max_tokens=max_tokens,
        temperature=(p.temperature or 1.0) if sampling else 0.0,
        top_p=p.top_p or 1.0,
        top_k=p.top_k or 0,
        repetition_penalty=p.repetition_penalty or 1.0,
        frequency_penalty=p.frequency_penalty or 0.0,
        seed=p.seed,
        stop=p.stop or None,
        logprobs=p.top_n_tokens or 0,  # always: each token's own text and log-probability are in TGI's answer
        prompt_logprobs=0 if p.decoder_input_details else None,
        structured_outputs=_constraint(p.grammar),
        output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
    )
    return Generation(
        state=state,
        route=route,
        prompts=[EnginePrompt(ids, params, req.inputs)],
        n=1,
        request_id=new_id("tgi"),
        arrival=arrival,
        stream=stream,
    )


async def generate(
    state: ServerState, req: GenerateRequest, request: Request, *, stream: bool, as_list: bool
) -> Response:
    """Answer one TGI request: `{"generated_text", "details"}` (a one-item list on `/`), or a token stream."""
    gen = prepare(state, req, stream, time.monotonic())
    request.state.model_label = gen.label
    params = req.parameters
    first_id = gen.prompts[0].token_ids[0]
    first_token = (first_id, str(state.engine.tokenizer.decode([first_id])))
    answer = TGIAnswer(params, state.special_ids, req.inputs, first_token)
    seed = params.seed if params.samples() else None
    slot = await admitted(state, request, gen)
    if not stream:

        async def respond() -> Response:
            await collect(gen, [answer], slot)
            body: dict[str, Any] = answer.final()
            if params.details:
                body["details"] = answer.details(seed)
            return json_response([body] if as_list else body)

        return await cancel_on_disconnect(request, respond())

    try:
        outputs = await start_stream(gen)
    except BaseException:
        slot.release()
        raise

    async def events() -> AsyncIterator[bytes]:
        try:
            last: dict[str, Any] | None = None
            async for _, out in outputs:
                for delta in out.choices:
                    for event in answer.update(delta, out, True):
                        if last is not None:
                            yield sse(last)
                        last = event
            if last is not None:
                last["generated_text"] = answer.generated_text()
                last["details"] = {
                    "finish_reason": answer.finish_reason,
                    "generated_tokens": len(answer.tokens),
                    "seed": seed,
                    "input_length": len(gen.prompts[0].token_ids),
                }
                yield sse(last)
        except Exception as exc:
            err = as_openai_error(exc)
            yield sse({"error": err.message, "error_type": TGI_ERRORS.get(err.status, (0, "generation"))[1]})
        finally:
            with anyio.CancelScope(shield=True):
                await outputs.aclose()
            slot.release()

    return streaming_response(events())
