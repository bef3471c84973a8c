"""Text completions on the shared pipeline: one engine request per prompt (a prompt list gives
`len(prompts) * n` choices, prompt i's j-th sample at index `i * n + j`, as in OpenAI's API).

Invariants: `usage` sums token counts over all prompts; with `echo` each choice's text and logprobs start
with its prompt's (the first prompt token has no log-probability); `max_tokens: 0` scores the prompt and
generates nothing (vLLM generates one token, which is dropped and not counted).
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from serve.engine.protocol import ChoiceDelta, EngineOutput, TokenLogprob
from serve.errors import OpenAIError
from serve.openai.completions.protocol import CompletionRequest
from serve.openai.fields import check_extra_fields
from serve.openai.pipeline import EnginePrompt, Generation, check_context, new_id, respond
from serve.state import ServerState


class CompletionLogprobs:
    """OpenAI's legacy logprobs object, built token by token (`text_offset` runs over the choice's text)."""

    def __init__(self) -> None:
        self.offset = 0
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []
        self.text_offset: list[int] = []

    def add(
        self, items: tuple[TokenLogprob | None, ...] | list[TokenLogprob | None], first_token: str = ""
    ) -> None:
        """Append positions; a None position (the prompt's first token) is `first_token` with no logprob."""
        for lp in items:
            token = first_token if lp is None else lp.token
            self.tokens.append(token)
            self.token_logprobs.append(None if lp is None else lp.logprob)
            self.top_logprobs.append(None if lp is None else {t: v for _, t, v in lp.top})
            self.text_offset.append(self.offset)
            self.offset += len(token)

    def as_dict(self, start: int = 0) -> dict[str, Any]:
        return {
            "tokens": self.tokens[start:],
            "token_logprobs": self.token_logprobs[start:],
            "top_logprobs": self.top_logprobs[start:],
            "text_offset": self.text_offset[start:],
        }


def _prompt_logprobs_field(
    items: tuple[TokenLogprob | None, ...] | None,
) -> list[dict[str, Any] | None] | None:
    """vLLM's `prompt_logprobs` field: per prompt token, {token id: {logprob, decoded_token}} or None."""
    if items is None:
        return None
    out: list[dict[str, Any] | None] = []
    for lp in items:
        if lp is None:
            out.append(None)
            continue
        entry = {str(tid): {"logprob": v, "decoded_token": t} for tid, t, v in lp.top}
        entry.setdefault(str(lp.token_id), {"logprob": lp.logprob, "decoded_token": lp.token})
        out.append(entry)
    return out


class CompletionChoice:
    """One output sequence of one prompt (see `serve.openai.pipeline.Choice`)."""

    def __init__(self, index: int, prompt: EnginePrompt, req: CompletionRequest, first_token: str) -> None:
        self.index = index
        self._prompt = prompt
        self._first_token = first_token
        self._req = req
        self._text: list[str] = []
        self._logprobs = CompletionLogprobs() if req.logprobs is not None else None
        self._finish: str | None = None
        self._echoed = not req.echo
        self._prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None

    def start(self) -> list[dict[str, Any]]:
        return []

    def _echo(self, output: EngineOutput) -> str:
        """The prompt's text (and logprobs) once, before the first generated text."""
        if self._echoed:
            return ""
        self._echoed = True
        text = self._prompt.text or ""
        if self._logprobs is not None:
            if output.prompt_logprobs is None:
                raise OpenAIError(500, "the engine returned no prompt logprobs for echo")
            self._logprobs.add(output.prompt_logprobs, first_token=self._first_token)
        return text

    def update(self, delta: ChoiceDelta, output: EngineOutput, streaming: bool) -> list[dict[str, Any]]:
        if output.prompt_logprobs is not None:
            self._prompt_logprobs = output.prompt_logprobs
        start = len(self._logprobs.tokens) if self._logprobs is not None else 0
        text = self._echo(output)
        if not self._prompt.scoring_only:
            text += delta.text
            if self._logprobs is not None and delta.logprobs:
                self._logprobs.add(delta.logprobs)
        self._text.append(text)
        finish = "length" if self._prompt.scoring_only and delta.finish_reason else delta.finish_reason
        self._finish = finish or self._finish
        if not streaming or not (text or finish):
            return []
        lp = self._logprobs.as_dict(start) if self._logprobs is not None else None
        return [{"index": self.index, "text": text, "logprobs": lp, "finish_reason": finish}]

    def final(self) -> dict[str, Any]:
        choice = {
            "index": self.index,
            "text": "".join(self._text),
            "logprobs": self._logprobs.as_dict() if self._logprobs is not None else None,
            "finish_reason": self._finish,
        }
        if self._req.prompt_logprobs is not None:
            choice["prompt_logprobs"] = _prompt_logprobs_field(self._prompt_logprobs)
        return choice


def _token_prompts(state: ServerState, req: CompletionRequest) -> list[tuple[list[int], str | None]]:
    """(token ids, text) of every prompt; token-id prompts are range-checked (400)."""
    prompts: list[Any] = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
    if not prompts:
        raise OpenAIError(400, "prompt is an empty list", param="prompt")
    if all(isinstance(p, int) for p in prompts):
        prompts = [prompts]
    out: list[tuple[list[int], str | None]] = []
    for p in prompts:
        if isinstance(p, str):
            out.append((state.encode(p, add_special_tokens=req.add_special_tokens), p))
        else:
            ids = [int(t) for t in p]
            if any(t >= state.vocab_size for t in ids):
                raise OpenAIError(400, f"prompt token ids must be in [0, {state.vocab_size})", param="prompt")
            out.append((ids, None))
    if req.truncate_prompt_tokens is not None:
        out = [
            (ids[-req.truncate_prompt_tokens :], None if len(ids) > req.truncate_prompt_tokens else text)
            for ids, text in out
        ]
    return out


def prepare(state: ServerState, req: CompletionRequest, arrival: float) -> Generation:
    """The request as a `Generation` (nothing started)."""
    check_extra_fields(req, "completions")
    route = state.router.resolve(req.model)
    defaults = state.engine.default_sampling
    tokenizer = state.engine.tokenizer
    scoring_only = req.max_tokens == 0
    prompt_logprobs = req.prompt_logprobs
    if req.echo and req.logprobs is not None and prompt_logprobs is None:
        prompt_logprobs = req.logprobs
    prompts = []
    for ids, text in _token_prompts(state, req):
        max_tokens = check_context(
            len(ids), 1 if scoring_only else req.max_tokens, state.engine.max_model_len, "prompt"
        )
        params = req.sampling_params(
            max_tokens=max_tokens,
            defaults=defaults,
            vocab_size=state.vocab_size,
            logprobs=None if scoring_only else req.logprobs,
            prompt_logprobs=prompt_logprobs,
            stream=req.stream,
        )
        if req.echo and text is None:
            text = str(tokenizer.decode(ids))
        prompts.append(EnginePrompt(ids, params, text, scoring_only))
    return Generation(
        state=state,
        route=route,
        prompts=prompts,
        n=req.n,
        request_id=new_id("cmpl"),
        arrival=arrival,
        stream=req.stream,
    )


async def create_completion(state: ServerState, req: CompletionRequest, request: Request) -> Response:
    """Answer one completion request (streamed or not)."""
    gen = prepare(state, req, time.monotonic())
    request.state.model_label = gen.label
    tokenizer = state.engine.tokenizer
    choices = [
        CompletionChoice(i * req.n + j, p, req, str(tokenizer.decode(p.token_ids[:1])) if req.echo else "")
        for i, p in enumerate(gen.prompts)
        for j in range(req.n)
    ]
    envelope = {
        "id": gen.request_id,
        "object": "text_completion",
        "created": gen.created,
        "model": req.model,
        "system_fingerprint": state.system_fingerprint,
    }
    options = req.stream_options

    def body() -> dict[str, Any]:
        return {**envelope, "choices": [c.final() for c in choices], "usage": gen.usage.as_dict()}

    return await respond(
        request,
        gen,
        choices,
        envelope,
        body,
        include_usage=bool(options and options.include_usage),
        continuous_usage=bool(options and options.include_usage and options.continuous_usage_stats),
    )
