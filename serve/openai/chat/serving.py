"""Chat completions on the shared pipeline: the conversation is rendered with the model's chat template
(tools included), each output sequence becomes an assistant message (text, tool calls, logprobs).

Invariant: `usage` comes from token counts (the prompt ids rendered here, the token ids the engine
produced); what differs from completions is only the prompt (a conversation), the request model and the
shape of a choice.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from core.chat import render_chat
from core.errors import DataError
from serve.engine.protocol import ChoiceDelta, EngineOutput, TokenLogprob
from serve.errors import OpenAIError
from serve.openai.chat.protocol import ChatCompletionRequest
from serve.openai.chat.reasoning import ReasoningSplit
from serve.openai.chat.tools import ParsedMessage, ToolPlan, ToolStream, parse_final, plan_tools
from serve.openai.fields import check_extra_fields
from serve.openai.pipeline import EnginePrompt, Generation, check_context, new_id, respond
from serve.state import ServerState


def chat_logprobs(items: list[TokenLogprob] | tuple[TokenLogprob, ...]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": lp.token,
                "logprob": lp.logprob,
                "bytes": list(lp.token.encode()),
                "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for _, t, v in lp.top],
            }
            for lp in items
        ]
    }


class ChatChoice:
    """One output sequence as an assistant message (see `serve.openai.pipeline.Choice`)."""

    def __init__(self, index: int, req: ChatCompletionRequest, plan: ToolPlan, state: ServerState, echo: str):
        self.index = index
        self._req = req
        self._plan = plan
        self._tokenizer = state.engine.tokenizer
        self._echo = echo
        self._role = state.response_role
        self._text: list[str] = []
        self._logprobs: list[TokenLogprob] = []
        self._finish: str | None = None
        self._tools: ToolStream | None = None
        self._reasoning = reasoning_split(state, req)

    def start(self) -> list[dict[str, Any]]:
        delta: dict[str, Any] = {"role": self._role, "content": self._echo}
        return [{"index": self.index, "delta": delta, "logprobs": None, "finish_reason": None}]

    def update(self, delta: ChoiceDelta, output: EngineOutput, streaming: bool) -> list[dict[str, Any]]:
        self._text.append(delta.text)
        if delta.logprobs:
            self._logprobs.extend(delta.logprobs)
        if not streaming:
            self._finish = delta.finish_reason or self._finish
            return []
        frames = []
        if delta.text or delta.token_ids:
            lp = chat_logprobs(delta.logprobs) if self._req.logprobs and delta.logprobs is not None else None
            content: str | None = delta.text
            thought = ""
            if self._reasoning is not None:
                thought, content = self._reasoning.feed(delta.text, delta.token_ids)
            tool_deltas: list[dict[str, Any]] = []
            if self._plan.parses_calls and content:
                if self._tools is None:
                    self._tools = ToolStream(self._plan, self._tokenizer)
                content, tool_deltas = self._tools.feed(content, delta.token_ids)
            if thought or content or tool_deltas or lp is not None:
                body: dict[str, Any] = {}
                if thought:
                    body["reasoning_content"] = thought
                if content:
                    body["content"] = content
                if tool_deltas:
                    body["tool_calls"] = tool_deltas
                frames.append({"index": self.index, "delta": body, "logprobs": lp, "finish_reason": None})
        if delta.finish_reason is not None:
            finish = delta.finish_reason
            if self._tools is not None and self._tools.called and finish != "length":
                finish = "tool_calls"
            frames.append({"index": self.index, "delta": {}, "logprobs": None, "finish_reason": finish})
        return frames

    def final(self) -> dict[str, Any]:
        finish = self._finish
        reasoning, text = split_reasoning(self._reasoning, "".join(self._text))
        parsed = (
            parse_final(self._plan, text, self._tokenizer, truncated=finish == "length")
            if text is not None
            else ParsedMessage(None)
        )
        message: dict[str, Any] = {"role": self._role, "content": _with_echo(self._echo, parsed)}
        if reasoning is not None:
            message["reasoning_content"] = reasoning
        if parsed.tool_calls:
            message["tool_calls"] = parsed.tool_calls
            if finish != "length":  # a cut answer says so, with the calls that completed (as streamed)
                finish = "tool_calls"
        return {
            "index": self.index,
            "message": message,
            "logprobs": chat_logprobs(self._logprobs) if self._req.logprobs else None,
            "finish_reason": finish,
        }


def reasoning_split(state: ServerState, req: ChatCompletionRequest) -> ReasoningSplit | None:
    """The splitter of one output sequence under the server's `--reasoning-parser` (None without one)."""
    name = state.settings.vllm.reasoning_parser
    if not name:
        return None
    kwargs = {**state.chat_template_kwargs, **(req.chat_template_kwargs or {})}
    return ReasoningSplit(name, state.engine.tokenizer, kwargs)


def split_reasoning(split: ReasoningSplit | None, text: str) -> tuple[str | None, str | None]:
    """(reasoning, answer) of a finished output: all of it is the answer without a parser."""
    return (None, text) if split is None else split.split(text)


def _with_echo(echo: str, parsed: ParsedMessage) -> str | None:
    if parsed.content is None:
        return echo or None
    return echo + parsed.content


def chat_tool_plan(state: ServerState, req: ChatCompletionRequest) -> ToolPlan:
    """The request's tool plan, with the server's tool-call parser for `auto`."""
    return plan_tools(req, state.settings.tool_call_parser, state.exclude_tools_when_none)


def render_prompt(state: ServerState, req: ChatCompletionRequest, plan: ToolPlan) -> list[int]:
    """The prompt token ids of the conversation, rendered by the model's chat template with the plan's
    tools (400 if the template refuses it). The Messages API's count_tokens counts exactly these."""
    messages = [m.for_template() for m in req.messages]
    try:
        prompt = render_chat(
            state.engine.tokenizer,
            messages,
            add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message,
            tools=list(plan.tools) or None,
            template_kwargs={**state.chat_template_kwargs, **(req.chat_template_kwargs or {})} or None,
        )
    except DataError as err:
        raise OpenAIError(400, str(err), param="messages") from None
    except Exception as err:  # the model's own template refused the conversation (a jinja `raise_exception`)
        raise OpenAIError(
            400, f"the chat template cannot render these messages: {err}", param="messages"
        ) from None
    return state.encode(prompt)


def prepare(
    state: ServerState, req: ChatCompletionRequest, arrival: float, request_id: str | None = None
) -> tuple[Generation, ToolPlan, str]:
    """The request as a `Generation` (nothing started), its tool plan and the text echoed before the
    answer (vLLM's `echo`: the final message's content when the answer continues that role).
    `request_id`: the engine request's id (default a new `chatcmpl-...`)."""
    check_extra_fields(req, "chat")
    route = state.router.resolve(req.model)
    plan = chat_tool_plan(state, req)
    prompt_ids = render_prompt(state, req, plan)
    defaults = state.engine.default_sampling
    requested = req.requested_max_tokens()
    max_tokens = check_context(len(prompt_ids), requested, state.engine.max_model_len, "messages")
    if requested is None and "max_tokens" in defaults:
        max_tokens = min(max_tokens, int(defaults["max_tokens"]))
    skip_special = False if plan.mode == "auto" else None  # tool-call tags may be special tokens (hermes)
    params = req.sampling_params(
        max_tokens=max_tokens,
        defaults=defaults,
        vocab_size=state.vocab_size,
        logprobs=req.num_logprobs(),
        stream=req.stream,
        structured=plan.constraint(),
        skip_special_tokens=skip_special,
    )
    last = req.messages[-1]
    echo = (last.text() or "") if req.echo and last.role == "assistant" else ""
    gen = Generation(
        state=state,
        route=route,
        prompts=[EnginePrompt(prompt_ids, params)],
        n=req.n,
        request_id=request_id or new_id("chatcmpl"),
        arrival=arrival,
        stream=req.stream,
    )
    return gen, plan, echo


async def create_chat_completion(
    state: ServerState, req: ChatCompletionRequest, request: Request
) -> Response:
    """Answer one chat request (streamed or not)."""
    gen, plan, echo = prepare(state, req, time.monotonic())
    request.state.model_label = gen.label
    choices = [ChatChoice(i, req, plan, state, echo) for i in range(req.n)]
    envelope = {
        "id": gen.request_id,
        "created": gen.created,
        "model": req.model,
        "system_fingerprint": state.system_fingerprint,
    }
    options = req.stream_options

    def body() -> dict[str, Any]:
        return {
            **envelope,
            "object": "chat.completion",
            "choices": [c.final() for c in choices],
            "usage": gen.usage.as_dict(),
        }

    return await respond(
        request,
        gen,
        choices,
        {**envelope, "object": "chat.completion.chunk"},
        body,
        include_usage=bool(options and options.include_usage),
        continuous_usage=bool(options and options.include_usage and options.continuous_usage_stats),
    )
