"""Anthropic's Messages API on the chat pipeline: a Messages request is translated into the chat request it
means (system prompt, turns, tool calls and results, tools and tool_choice, sampling), prepared by chat's
own `prepare` (same template rendering, tool grammar, sampling defaults, adapters by `model`) and run by the
shared pipeline (admission, metrics, abort on disconnect); only the answer's shape is Anthropic's.

- Tool choice: `auto` is chat's `auto` (the server's tool-call parser reads the calls), `any` is chat's
  `required` and `{"type": "tool", "name"}` a named function, both under the same JSON Schema constraint,
  so every `tool_use.input` is valid for its tool's `input_schema`; `disable_parallel_tool_use` is chat's
  `parallel_tool_calls: false`; `none` shows the tools but parses no call.
- A final assistant message is a prefill: the answer continues it (and does not repeat it).
- `thinking` blocks passed back are not shown to the model again; `thinking: {"type": "enabled"}` (or
  `adaptive`) is a 400 while this server runs no reasoning parser. With `--reasoning-parser` the model's
  reasoning is split off the answer (tool calls are read from the answer only) and returned as a
  `thinking` block before the answer's blocks when thinking is enabled or adaptive (empty with
  `display: "omitted"`, left out when thinking is off); `budget_tokens` is vLLM's `thinking_token_budget`:
  the engine ends the reasoning (forces `</think>`) once it has used that many tokens.

Invariants: `usage.input_tokens + usage.cache_read_input_tokens` is the prompt's token count and
`usage.output_tokens` the tokens the engine generated (the numbers the token metrics count); a stream is
`message_start`, `ping`, then per content block `content_block_start`, deltas, `content_block_stop`, then
`message_delta` (stop reason, usage) and `message_stop`, with `ping`s while the engine is quiet and an
`error` event (ending the stream) if it fails after its 200.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

import anyio
from fastapi import Request
from fastapi.responses import Response
from pydantic import ValidationError

from core.config import describe_problems
from serve.anthropic.errors import anthropic_error_event
from serve.anthropic.messages.protocol import (
    CountTokensRequest,
    Message,
    MessagesRequest,
    TextBlock,
    ThinkingEnabled,
    ToolResultBlock,
    ToolUseBlock,
)
from serve.engine.protocol import ChoiceDelta, EngineOutput
from serve.errors import OpenAIError
from serve.openai.chat.protocol import ChatCompletionRequest
from serve.openai.chat.reasoning import ReasoningSplit
from serve.openai.chat.serving import chat_tool_plan, reasoning_split, render_prompt, split_reasoning
from serve.openai.chat.serving import prepare as prepare_chat
from serve.openai.chat.tools import ParsedMessage, ToolPlan, ToolStream, parse_final
from serve.openai.fields import check_extra_fields
from serve.openai.pipeline import (
    JSON,
    Generation,
    PrimedOutputs,
    admitted,
    cancel_on_disconnect,
    collect,
    json_response,
    start_stream,
    streaming_response,
)
from serve.state import ServerState

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PING_INTERVAL_S = 10.0  # a `ping` event whenever the engine has been quiet this long during a stream
TOOL_CHOICES = {"auto": "auto", "any": "required", "none": "none"}


def message_id() -> str:
    return f"msg_{uuid.uuid4().hex[:24]}"


def tool_use_id() -> str:
    return f"toolu_{uuid.uuid4().hex[:24]}"


def event(payload: dict[str, Any]) -> bytes:
    """One server-sent event as Anthropic sends it: `event: <type>` and the JSON payload."""
    return b"event: " + payload["type"].encode() + b"\ndata: " + JSON.encode(payload) + b"\n\n"


# ---- request: the chat request a Messages request means


def _turns(message: Message, index: int) -> list[dict[str, Any]]:
    """The chat messages of one Anthropic message: tool results become `tool` messages (before the user's
    text, as Anthropic orders them), tool uses the assistant's `tool_calls`; thinking is left out."""
    if isinstance(message.content, str):
        return [{"role": message.role, "content": message.content}]
    text: list[str] = []
    calls: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for block in message.content:
        if isinstance(block, TextBlock):
            text.append(block.text)
        elif isinstance(block, ToolUseBlock):
            if message.role != "assistant":
                raise OpenAIError(
                    400, "tool_use blocks belong to assistant messages", param=f"messages.{index}"
                )
            arguments = json.dumps(block.input, ensure_ascii=False)
            calls.append(
                {"id": block.id, "type": "function", "function": {"name": block.name, "arguments": arguments}}
            )
        elif isinstance(block, ToolResultBlock):
            if message.role != "user":
                raise OpenAIError(
                    400, "tool_result blocks belong to user messages", param=f"messages.{index}"
                )
            content = block.text()
            if block.is_error:
                content = f"Error: {content}"
            results.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": content})
        # thinking / redacted_thinking: the model does not read its earlier thinking again
    turns = results
    if message.role == "assistant":
        turn: dict[str, Any] = {"role": "assistant", "content": "".join(text) or (None if calls else "")}
        if calls:
            turn["tool_calls"] = calls
        turns.append(turn)
    elif text or not results:
        turns.append({"role": "user", "content": "\n".join(text)})
    return turns


def to_chat_request(req: MessagesRequest | CountTokensRequest) -> ChatCompletionRequest:
    """The chat completions request `req` means (400 where it cannot be expressed)."""
    messages: list[dict[str, Any]] = []
    if (system := req.system_text()) is not None:
        messages.append({"role": "system", "content": system})
    for index, message in enumerate(req.messages):
        messages.extend(_turns(message, index))
    last = req.messages[-1]
    prefill = last.role == "assistant"
    if prefill and "tool_calls" in messages[-1]:
        raise OpenAIError(
            400,
            "the last message is an assistant tool_use: answer it with a user tool_result",
            param="messages",
        )
    body: dict[str, Any] = {
        "model": req.model,
        "messages": messages,
        "add_generation_prompt": not prefill,
        "continue_final_message": prefill,
    }
    if req.tools:
        body["tools"] = [
            {
                "type": "function",
                "function": {"name": t.name, "description": t.description, "parameters": t.input_schema},
            }
            for t in req.tools
        ]
    choice = req.tool_choice
    if choice is not None:
        body["tool_choice"] = (
            {"type": "function", "function": {"name": choice.name}}
            if choice.type == "tool"
            else TOOL_CHOICES[choice.type]
        )
        if choice.disable_parallel_tool_use:
            body["parallel_tool_calls"] = False
    if isinstance(req, MessagesRequest):
        body.update(max_tokens=req.max_tokens, stream=req.stream)
        sampling = {"temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k}
        body.update({k: v for k, v in sampling.items() if v is not None})
        if req.stop_sequences:
            body["stop"] = req.stop_sequences
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as err:  # a conversation chat cannot express (e.g. an empty user turn)
        raise OpenAIError(400, describe_problems(err.errors(), limit=5), param="messages") from None


def check_thinking(req: MessagesRequest, reasoning_parser: str) -> None:
    """400 for thinking on a server that cannot split reasoning off the answer."""
    if req.thinking is not None and req.thinking.type != "disabled" and not reasoning_parser:
        raise OpenAIError(
            400,
            f"thinking type {req.thinking.type!r}: this server runs no reasoning parser, so it cannot return "
            'thinking blocks; leave thinking out or send {"type": "disabled"}',
            param="thinking",
        )


# ---- answer: content blocks, streamed or whole


def usage(gen: Generation) -> dict[str, int]:
    """Anthropic's usage: `input_tokens` are the prompt tokens the prefix cache did not hold."""
    cached = gen.usage.cached_prompt_tokens
    return {
        "input_tokens": gen.usage.prompt_tokens - cached,
        "output_tokens": gen.usage.completion_tokens,
        "cache_read_input_tokens": cached,
        "cache_creation_input_tokens": 0,
    }


def _tool_input(arguments: str) -> dict[str, Any]:
    """A call's `input` object (generated under its schema with `any` / `tool`; an `auto` call that is no
    JSON object, which the tool parsers do not return, would be `{}`)."""
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


class MessageAnswer:
    """The one output sequence of a Messages request, as content blocks (a `serve.openai.pipeline.Choice`):
    `update` gives the stream's block events, `final` the whole message's content and stop reason."""

    def __init__(
        self,
        plan: ToolPlan,
        tokenizer: PreTrainedTokenizerBase,
        reasoning: ReasoningSplit | None = None,
        thinking: str | None = None,
    ) -> None:
        """`reasoning`: the server's reasoning split (None: no parser); `thinking`: None (no thinking
        blocks), "summarized" (the reasoning as it is) or "omitted" (thinking blocks with empty text)."""
        self._plan = plan
        self._tokenizer = tokenizer
        self._reasoning = reasoning
        self._thinking = thinking
        self._text: list[str] = []
        self._finish: str | None = None
        self._stop: str | int | None = None
        self._tools: ToolStream | None = None
        self._blocks = 0  # content blocks started so far
        self._open: int | None = None  # index of the block being streamed
        self._open_is_text = False
        self._call_blocks: dict[int, int] = {}  # tool call index -> its block index
        self.streamed_calls = False

    def start(self) -> list[dict[str, Any]]:
        return []

    def update(self, delta: ChoiceDelta, output: EngineOutput, streaming: bool) -> list[dict[str, Any]]:
        self._text.append(delta.text)
        if delta.finish_reason is not None:
            self._finish, self._stop = delta.finish_reason, delta.stop_reason
        if not streaming:
            return []
        events: list[dict[str, Any]] = []
        if delta.text or delta.token_ids:
            content: str | None = delta.text
            if self._reasoning is not None:
                thought, content = self._reasoning.feed(delta.text, delta.token_ids)
                if thought and self._thinking is not None:
                    self._thinking_delta(thought if self._thinking == "summarized" else "", events)
            calls: list[dict[str, Any]] = []
            if self._plan.parses_calls and content:
                if self._tools is None:
                    self._tools = ToolStream(self._plan, self._tokenizer)
                content, calls = self._tools.feed(content, delta.token_ids)
            if content:
                self._text_delta(content, events)
            for call in calls:
                self._tool_delta(call, events)
        if delta.finish_reason is not None:
            self._close(events)
        return events

    def _start_block(self, block: dict[str, Any], text: bool, events: list[dict[str, Any]]) -> int:
        self._close(events)
        index, self._blocks = self._blocks, self._blocks + 1
        self._open, self._open_is_text = index, text
        events.append({"type": "content_block_start", "index": index, "content_block": block})
        return index

    def _close(self, events: list[dict[str, Any]]) -> None:
        if self._open is not None:
            events.append({"type": "content_block_stop", "index": self._open})
            self._open = None

    def _thinking_delta(self, thought: str, events: list[dict[str, Any]]) -> None:
        """Reasoning text: the thinking block is the first block, opened on the first reasoning delta."""
        if self._blocks == 0:
            self._start_block({"type": "thinking", "thinking": "", "signature": ""}, False, events)
        if thought and self._open == 0:
            delta = {"type": "thinking_delta", "thinking": thought}
            events.append({"type": "content_block_delta", "index": 0, "delta": delta})

    def _text_delta(self, text: str, events: list[dict[str, Any]]) -> None:
        if self._open is None or not self._open_is_text:
            self._start_block({"type": "text", "text": ""}, True, events)
        delta = {"type": "text_delta", "text": text}
        events.append({"type": "content_block_delta", "index": self._open, "delta": delta})

    def _tool_delta(self, call: dict[str, Any], events: list[dict[str, Any]]) -> None:
        """An OpenAI tool-call delta (chat's `ToolStream`) as a `tool_use` block's start or input fragment."""
        function = call.get("function") or {}
        block = self._call_blocks.get(call["index"])
        if block is None or "id" in call:
            head = {"type": "tool_use", "id": tool_use_id(), "name": function.get("name", ""), "input": {}}
            block = self._call_blocks[call["index"]] = self._start_block(head, False, events)
            self.streamed_calls = True
        if fragment := function.get("arguments"):
            delta = {"type": "input_json_delta", "partial_json": fragment}
            events.append({"type": "content_block_delta", "index": block, "delta": delta})

    def stop_reason(self, called: bool) -> tuple[str | None, str | None]:
        """(stop_reason, stop_sequence): `max_tokens` wins; complete tool calls are `tool_use`."""
        if self._finish is None:
            return None, None
        if self._finish == "length":
            return "max_tokens", None
        if called:
            return "tool_use", None
        if isinstance(self._stop, str):
            return "stop_sequence", self._stop
        return "end_turn", None

    def final(self) -> dict[str, Any]:
        reasoning, text = split_reasoning(self._reasoning, "".join(self._text))
        parsed = (
            parse_final(self._plan, text, self._tokenizer, self._finish == "length")
            if text is not None
            else ParsedMessage(None)
        )
        content: list[dict[str, Any]] = []
        if reasoning is not None and self._thinking is not None:
            shown = reasoning if self._thinking == "summarized" else ""
            content.append({"type": "thinking", "thinking": shown, "signature": ""})
        if parsed.content:
            content.append({"type": "text", "text": parsed.content})
        for call in parsed.tool_calls:
            function = call["function"]
            content.append(
                {
                    "type": "tool_use",
                    "id": tool_use_id(),
                    "name": function["name"],
                    "input": _tool_input(function["arguments"]),
                }
            )
        stop_reason, stop_sequence = self.stop_reason(bool(parsed.tool_calls))
        return {"content": content, "stop_reason": stop_reason, "stop_sequence": stop_sequence}


# ---- the endpoints


def prepare(state: ServerState, req: MessagesRequest, arrival: float) -> tuple[Generation, MessageAnswer]:
    """The request as a `Generation` (nothing started) and the answer that will shape its output."""
    check_extra_fields(req, "messages")
    parser = state.settings.vllm.reasoning_parser
    check_thinking(req, parser)
    chat = to_chat_request(req)
    gen, plan, _ = prepare_chat(state, chat, arrival, request_id=message_id())
    thinking = req.thinking
    shown = None
    if thinking is not None and thinking.type != "disabled":
        shown = thinking.display or "summarized"
        if isinstance(thinking, ThinkingEnabled):
            for prompt in gen.prompts:
                prompt.params.thinking_token_budget = thinking.budget_tokens
    return gen, MessageAnswer(plan, state.engine.tokenizer, reasoning_split(state, chat), shown)


def _envelope(gen: Generation, model: str) -> dict[str, Any]:
    return {"id": gen.request_id, "type": "message", "role": "assistant", "model": model}


async def create_message(state: ServerState, req: MessagesRequest, request: Request) -> Response:
    """Answer one Messages request: the whole message, or Anthropic's event stream."""
    gen, answer = prepare(state, req, time.monotonic())
    request.state.model_label = gen.label
    slot = await admitted(state, request, gen)
    if not req.stream:

        async def respond() -> Response:
            await collect(gen, [answer], slot)
            return json_response({**_envelope(gen, req.model), **answer.final(), "usage": usage(gen)})

        return await cancel_on_disconnect(request, respond())

    try:
        outputs = await start_stream(gen)
    except BaseException:
        slot.release()
        raise

    async def events() -> AsyncIterator[bytes]:
        try:
            start = {**_envelope(gen, req.model), "content": [], "stop_reason": None, "stop_sequence": None}
            yield event({"type": "message_start", "message": {**start, "usage": usage(gen)}})
            yield event({"type": "ping"})
            async with aclosing(paced(outputs, PING_INTERVAL_S)) as items:
                async for item in items:
                    if item is None:
                        yield event({"type": "ping"})
                        continue
                    for delta in item[1].choices:
                        for payload in answer.update(delta, item[1], True):
                            yield event(payload)
            stop_reason, stop_sequence = answer.stop_reason(answer.streamed_calls)
            stop = {"stop_reason": stop_reason, "stop_sequence": stop_sequence}
            yield event({"type": "message_delta", "delta": stop, "usage": usage(gen)})
            yield event({"type": "message_stop"})
        except Exception as exc:
            yield anthropic_error_event(exc)
        finally:
            with anyio.CancelScope(shield=True):  # the client may be gone: finish the clean-up anyway
                await outputs.aclose()
            slot.release()

    return streaming_response(events())


async def paced(
    outputs: PrimedOutputs, interval: float
) -> AsyncGenerator[tuple[int, EngineOutput] | None, None]:
    """`outputs`, with a None whenever none came for `interval` seconds (the stream's `ping`).

    One task per stream reads `outputs` into a buffer; the caller waits on a future only when the buffer is
    empty. (Waiting on a task per output, with a timeout, cost 43 us more per output than iterating
    `outputs` directly; this costs 12 us more: measured on the EPYC with an engine stand-in that yields to
    the event loop once per output.) Left early, the reader is cancelled (its engine request is aborted by
    the pipeline's clean-up) before this returns, so that `outputs` can then be closed."""
    loop = asyncio.get_running_loop()
    buffer: deque[tuple[int, EngineOutput]] = deque()
    state: dict[str, Any] = {"waiter": None, "done": False, "error": None}

    def wake(_: object = None) -> None:
        waiter = state["waiter"]
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def read() -> None:
        try:
            async for item in outputs:
                buffer.append(item)
                wake()
        except Exception as exc:
            state["error"] = exc
        finally:
            state["done"] = True
            wake()

    reader = loop.create_task(read())
    try:
        while True:
            while buffer:
                yield buffer.popleft()
            if state["done"]:
                if state["error"] is not None:
                    raise state["error"]
                return
            state["waiter"] = loop.create_future()
            timer = loop.call_later(interval, wake)
            try:
                await state["waiter"]
            finally:
                timer.cancel()
            if not buffer and not state["done"]:
                yield None
    finally:
        if not reader.done():
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader


async def count_tokens(state: ServerState, req: CountTokensRequest) -> dict[str, int]:
    """`{"input_tokens"}`: the prompt a Messages request with this conversation and these tools would have
    (rendered exactly as `create_message` renders it; the model is resolved as there: 404 if unknown)."""
    check_extra_fields(req, "count_tokens")
    state.router.resolve(req.model)
    chat = to_chat_request(req)
    return {"input_tokens": len(render_prompt(state, chat, chat_tool_plan(state, chat)))}
