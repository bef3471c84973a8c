"""Tool calling for chat completions: what `tool_choice` asks for, how generation is constrained, and how
the generated text becomes OpenAI tool calls (whole, or streamed as argument fragments).

- `auto`: the model writes freely; vLLM's tool parser chosen by `--tool-call-parser` (default `hermes`,
  the format of the fallback tool prompt in core/chat.py) finds the calls in its text.
- `required`: generation is constrained (vLLM structured outputs) to a JSON array of
  `{"name": <one of the functions>, "arguments": <that function's parameters schema>}`, at least one item
  and at most `MAX_PARALLEL_CALLS` (exactly one when `parallel_tool_calls` is false), so every call's
  arguments validate against the schema. The answer is its *complete, distinct* calls: a call identical
  (same name, same arguments as JSON) to an earlier one is dropped, and when `max_tokens` cuts the array the
  calls completed before the cut are still returned (finish_reason stays "length"). A grammar cannot forbid
  repeats (xgrammar ignores `uniqueItems`), so the bound ends a repeating model and the server de-duplicates.
  Streamed, each such call goes out whole once it is complete and new, so the stream ends with exactly the
  non-streamed answer's calls.
- a named function: generation is constrained to that function's parameters schema; the text *is* the
  arguments.
- `none`: tools are shown to the model, but no call is parsed.

Invariant: with `required` or a named function, every returned call's `arguments` is the exact JSON text the
model generated under the schema constraint, and the streamed fragments of a call concatenate to the same
text as the non-streamed answer's (same calls, same order).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from vllm.sampling_params import StructuredOutputsParams

from core.errors import ConfigError
from serve.errors import OpenAIError
from serve.openai.protocol import compact_json

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from serve.openai.chat.protocol import ChatCompletionRequest

Mode = Literal["none", "auto", "required", "named"]

MAX_PARALLEL_CALLS = 8
"""The most calls one `required` answer may hold when parallel calls are allowed: a bound on a model that
repeats its call (small models do, until max_tokens) without ruling out several calls of one function."""


def tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def function_call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


@dataclass(frozen=True)
class ToolPlan:
    """What a request's `tools` / `tool_choice` ask for, decided once per request."""

    mode: Mode
    tools: tuple[dict[str, Any], ...] = ()
    named: str | None = None
    parallel: bool = True
    parser_name: str | None = None
    vllm_request: Any = None  # vLLM's ChatCompletionRequest, which its tool parsers read (auto mode only)

    @property
    def parses_calls(self) -> bool:
        return self.mode != "none" and bool(self.tools)

    def constraint(self) -> StructuredOutputsParams | None:
        """The structured-output constraint of `required` / named modes (None otherwise)."""
        if self.mode == "named":
            return compact_json(_parameters(self._function(self.named)))
        if self.mode == "required":
            return compact_json(required_schema(self.tools, self.parallel))
        return None

    def _function(self, name: str | None) -> dict[str, Any]:
        for tool in self.tools:
            if tool["function"]["name"] == name:
                return dict(tool["function"])
        raise OpenAIError(400, f"tool_choice names {name!r}, which is not in tools", param="tool_choice")

    def parser(self, tokenizer: PreTrainedTokenizerBase) -> Any:
        """A fresh vLLM tool parser (stateful while streaming: one per choice)."""
        from vllm.tool_parsers.abstract_tool_parser import ToolParserManager

        parser_class = ToolParserManager.get_tool_parser(self.parser_name or "hermes")
        return parser_class(tokenizer, self.vllm_request.tools)  # type: ignore[arg-type]


def _parameters(function: dict[str, Any]) -> dict[str, Any]:
    return function.get("parameters") or {"type": "object", "properties": {}}


def required_schema(tools: tuple[dict[str, Any], ...], parallel: bool) -> dict[str, Any]:
    """JSON Schema of a `required` answer: a list of calls, each naming a function with its arguments."""
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "enum": [t["function"]["name"]]},
                "arguments": _parameters(t["function"]),
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    most = MAX_PARALLEL_CALLS if parallel else 1
    return {"type": "array", "minItems": 1, "maxItems": most, "items": {"anyOf": calls}}


def plan_tools(
    req: ChatCompletionRequest, parser_name: str | None, exclude_when_none: bool = False
) -> ToolPlan:
    """The `ToolPlan` of a request; 400 for a tool_choice that names no given function. With vLLM's
    `--exclude-tools-when-tool-choice-none`, `tool_choice: "none"` also keeps the tools out of the prompt."""
    tools = tuple(t.model_dump(exclude_none=True, by_alias=True) for t in req.tools or ())
    choice = req.tool_choice
    if exclude_when_none and choice == "none":
        return ToolPlan("none")
    parallel = req.parallel_tool_calls is not False
    if choice is None:
        choice = "auto" if tools else "none"
    if not tools:
        if choice not in ("none", "auto"):
            raise OpenAIError(400, "tool_choice needs tools", param="tool_choice")
        return ToolPlan("none")
    if isinstance(choice, str):
        mode: Mode = choice  # type: ignore[assignment]
        named = None
    else:
        mode, named = "named", choice.function.name
    plan = ToolPlan(mode, tools, named, parallel, parser_name)
    if mode == "named":
        plan._function(named)  # 400 if unknown
    if mode == "auto":
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as VllmRequest

        if parser_name is None:
            raise OpenAIError(
                400,
                'tool_choice "auto" needs the server started with --tool-call-parser',
                param="tool_choice",
            )
        vllm_request = VllmRequest.model_validate(
            {"model": req.model, "messages": [{"role": "user", "content": ""}], "tools": list(tools)}
        )
        plan = ToolPlan(mode, tools, None, parallel, parser_name, vllm_request)
    return plan


@dataclass
class ParsedMessage:
    """The assistant message of a finished choice: text content and/or tool calls."""

    content: str | None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


def parse_final(
    plan: ToolPlan, text: str, tokenizer: PreTrainedTokenizerBase, truncated: bool
) -> ParsedMessage:
    """The non-streamed message for `text`. A truncated named call (finish_reason "length") is returned as
    text: its JSON is incomplete, so it is no valid call. A `required` answer is its complete, distinct calls
    (cut or not; none when the cut came before the first call ended), never text."""
    if not plan.parses_calls or (truncated and plan.mode == "named"):
        return ParsedMessage(text)
    if plan.mode == "named":
        assert plan.named is not None
        return ParsedMessage(None, [function_call(tool_call_id(), plan.named, text)])
    if plan.mode == "required":
        return ParsedMessage(None, [function_call(tool_call_id(), n, a) for n, a in split_required(text)])
    info = plan.parser(tokenizer).extract_tool_calls(text, plan.vllm_request)
    if not info.tools_called:
        return ParsedMessage(text)
    calls = [function_call(tool_call_id(), c.function.name, c.function.arguments) for c in info.tool_calls]
    return ParsedMessage(info.content or None, calls)


def split_required(text: str) -> list[tuple[str, str]]:
    """(name, exact arguments text) of each complete, distinct call of a `required` answer, in order: a
    call cut by the end of `text` is left out, and so is a repeat of an earlier call."""
    scanner = RequiredCallScanner()
    scanner.feed(text)
    seen = DistinctCalls()
    return [(call.name, call.arguments) for call in scanner.calls if call.complete and seen.is_new(call)]


@dataclass
class _Call:
    name: str = ""
    arguments: str = ""
    complete: bool = False  # its object has closed


class DistinctCalls:
    """Which complete calls are new: identical means same name and same arguments as JSON values (so key
    order and spacing do not matter)."""

    def __init__(self) -> None:
        self._seen: set[tuple[str, str]] = set()

    def is_new(self, call: _Call) -> bool:
        try:
            key = json.dumps(json.loads(call.arguments), sort_keys=True)
        except json.JSONDecodeError:  # not reachable under the grammar; compare the text then
            key = call.arguments
        if (call.name, key) in self._seen:
            return False
        self._seen.add((call.name, key))
        return True


class RequiredCallScanner:
    """Incremental reader of a `required` answer, `[{"name": "...", "arguments": {...}}, ...]`, that gives
    each call's exact arguments text as it grows.

    Written by hand because the JSON libraries at hand (json, partial-json-parser) parse values and so
    re-serialise them: the fragments they give cannot concatenate to the model's exact text. The answer is
    generated under a JSON Schema constraint (and function parameters are always objects), so it is valid
    JSON of this shape; the scanner tracks only nesting depth, strings and escapes to find where each
    call object, its `name` and its `arguments` object start and end."""

    def __init__(self) -> None:
        self.calls: list[_Call] = []
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._string: list[str] = []
        self._last_key: str | None = None
        self._value_of: str | None = None  # the key whose value comes next (after its colon)
        self._args_depth: int | None = None  # depth outside the arguments object being read

    def feed(self, text: str) -> dict[int, str]:
        """Consume `text`; {call index: arguments text it added} for every call it touched (the text may be
        empty when only the call's name became known)."""
        touched: dict[int, str] = {}
        for char in text:
            if self._args_depth is not None:
                self.calls[-1].arguments += char
                touched[len(self.calls) - 1] = touched.get(len(self.calls) - 1, "") + char
                self._track_inside_arguments(char)
                continue
            if self._in_string:
                if self._string_char(char):
                    self._string.append(char)
                elif not self._in_string:
                    self._end_string("".join(self._string), touched)
            elif char == '"':
                self._in_string, self._string = True, []
            elif char == "{" and self._value_of == "arguments" and self.calls:
                self._args_depth = self._depth
                self._depth += 1
                self.calls[-1].arguments += char
                touched[len(self.calls) - 1] = touched.get(len(self.calls) - 1, "") + char
                self._value_of = None
            elif char in "{[":
                self._depth += 1
                if char == "{" and self._depth == 2:
                    self.calls.append(_Call())
                self._value_of = None
            elif char in "}]":
                if char == "}" and self._depth == 2 and self.calls:
                    self.calls[-1].complete = True
                self._depth -= 1
            elif char == ":":
                self._value_of = self._last_key
            elif char == ",":
                self._value_of = None
        return touched

    def _string_char(self, char: str) -> bool:
        """Inside a string: True if `char` is part of its value (escapes kept raw: only names, which are
        plain, are read from it); a closing quote ends the string."""
        if self._escape:
            self._escape = False
        elif char == "\\":
            self._escape = True
        elif char == '"':
            self._in_string = False
            return False
        return True

    def _track_inside_arguments(self, char: str) -> None:
        if self._in_string:
            self._string_char(char)
        elif char == '"':
            self._in_string = True
        elif char in "{[":
            self._depth += 1
        elif char in "}]":
            self._depth -= 1
            if self._depth == self._args_depth:
                self._args_depth = None

    def _end_string(self, value: str, touched: dict[int, str]) -> None:
        if self._value_of == "name" and self._depth == 2 and self.calls:
            self.calls[-1].name = value
            touched.setdefault(len(self.calls) - 1, "")
            self._value_of = None
        elif self._value_of is None:
            self._last_key = value
        else:
            self._value_of = None


class ToolStream:
    """Streams one choice's tool calls as OpenAI deltas (`tool_calls[i]` with id, type and name first, then
    `function.arguments` fragments); plain text as `content`. A `required` call goes out whole (head and
    all its arguments in one delta) once it is complete and new: only then is it known to be part of the
    answer (see the module docstring)."""

    def __init__(self, plan: ToolPlan, tokenizer: PreTrainedTokenizerBase) -> None:
        self._plan = plan
        self._ids: dict[int, str] = {}
        self._text = ""
        self._token_ids: list[int] = []
        self._scanner = RequiredCallScanner() if plan.mode == "required" else None
        self._distinct = DistinctCalls()
        self._settled = 0  # scanner calls already judged (sent or dropped as repeats)
        self._parser = plan.parser(tokenizer) if plan.mode == "auto" else None
        self.called = False

    def feed(self, text: str, token_ids: tuple[int, ...]) -> tuple[str | None, list[dict[str, Any]]]:
        """(content delta, tool-call deltas) for the next piece of generated text."""
        if self._plan.mode == "named":
            assert self._plan.named is not None
            deltas = []
            if 0 not in self._ids:
                self._ids[0] = tool_call_id()
                deltas.append(self._head(0, self._plan.named))
            if text:
                deltas.append(self._arguments(0, text))
            self.called = True
            return None, deltas
        if self._scanner is not None:
            self._scanner.feed(text)
            deltas = []
            calls = self._scanner.calls
            while self._settled < len(calls) and calls[self._settled].complete:
                call = calls[self._settled]
                self._settled += 1
                if self._distinct.is_new(call):
                    index = len(self._ids)
                    self._ids[index] = tool_call_id()
                    deltas.append(self._head(index, call.name, call.arguments))
            self.called = self.called or bool(self._ids)
            return None, deltas
        previous_text, previous_ids = self._text, list(self._token_ids)
        self._text += text
        self._token_ids.extend(token_ids)
        message = self._parser.extract_tool_calls_streaming(  # type: ignore[union-attr]
            previous_text, self._text, text, previous_ids, self._token_ids, token_ids, self._plan.vllm_request
        )
        if message is None:
            return None, []
        deltas = []
        for call in message.tool_calls or []:
            delta = call.model_dump(exclude_none=True)
            if "id" in delta:
                delta["id"] = self._ids.setdefault(call.index, tool_call_id())
            deltas.append(delta)
        self.called = self.called or bool(deltas)
        return message.content or None, deltas

    def _head(self, index: int, name: str, arguments: str = "") -> dict[str, Any]:
        function = {"name": name, "arguments": arguments}
        return {"index": index, "id": self._ids[index], "type": "function", "function": function}

    @staticmethod
    def _arguments(index: int, fragment: str) -> dict[str, Any]:
        return {"index": index, "function": {"arguments": fragment}}


def arguments_json(arguments: str) -> Any:
    """Parsed tool-call arguments (tests and logs); raises json.JSONDecodeError if they are not JSON."""
    return json.loads(arguments)


def check_tool_parser(name: str | None, plugin: str = "") -> None:
    """Refuse (at start-up) a `--tool-call-parser` that vLLM does not have: one `ConfigError` line. A
    `--tool-parser-plugin` file is imported first (as vLLM's server does), so it can register the name."""
    from vllm.tool_parsers import ToolParserManager

    if plugin:
        try:
            ToolParserManager.import_tool_parser(plugin)
        except Exception as err:
            raise ConfigError(f"--tool-parser-plugin {plugin!r} cannot be imported: {err}") from None
    if name is None:
        return

    known = set(ToolParserManager.tool_parsers) | set(ToolParserManager.lazy_parsers)
    if name not in known:
        raise ConfigError(f"--tool-call-parser {name!r} is not one of vLLM's: {', '.join(sorted(known))}")
