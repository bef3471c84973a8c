"""Wire models of POST /v1/chat/completions (request side; responses are built in serving.py).

Invariants: unknown top-level fields follow the field policy (serve/openai/fields.py); message objects accept
the extra keys SDKs echo back from earlier answers (`refusal`, `annotations`, ...), but a content part the
text-only models cannot read (image, audio, file) is a 400 naming the part.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serve.openai.protocol import MAX_LOGPROBS, SamplingFields, StreamOptions, _Nested, check_json_schema

TEXT_PART_TYPES = ("text", "refusal")
FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


class ChatMessage(BaseModel):
    """One message. `content` is a string, a list of text parts, or null (an assistant turn that only
    calls tools)."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None

    @field_validator("content")
    @classmethod
    def _text_parts_only(
        cls, content: str | list[dict[str, Any]] | None
    ) -> str | list[dict[str, Any]] | None:
        if isinstance(content, list):
            for index, part in enumerate(content):
                kind = part.get("type")
                if kind not in TEXT_PART_TYPES:
                    raise ValueError(
                        f"part {index} is of type {kind!r}: this server's models read text only "
                        "(parts of type 'text')"
                    )
                if not isinstance(part.get(kind), str):
                    raise ValueError(f"part {index} of type {kind!r} needs a string field {kind!r}")
        return content

    @model_validator(mode="after")
    def _content_where_needed(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        return self

    def text(self) -> str | None:
        if self.content is None or isinstance(self.content, str):
            return self.content
        return "".join(str(part.get(part["type"], "")) for part in self.content)

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates read it (`role`, `content` text, and tool fields if any)."""
        message: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class FunctionCallIn(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    arguments: str


class ToolCallIn(BaseModel):
    """A tool call of an earlier assistant message, as the SDKs send it back."""

    model_config = ConfigDict(extra="allow")

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCallIn


class FunctionDefinition(_Nested):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not FUNCTION_NAME.match(name):
            raise ValueError("a function name is 1-64 letters, digits, '_', '-', '.' or ':'")
        return name


class ToolDefinition(_Nested):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Nested):
    name: str


class NamedToolChoice(_Nested):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    stream: bool = False
    stream_options: StreamOptions | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # vLLM's chat extensions
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    echo: bool = False
    # OpenAI fields with nothing to do on a self-hosted server
    metadata: dict[str, str] | None = None
    store: bool | None = None
    modalities: list[Literal["text"]] | None = None
    service_tier: Literal["auto", "default"] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options needs stream: true")
        if self.store:
            raise ValueError("store: this server does not store completions")
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise ValueError("continue_final_message needs the last message to be an assistant message")
        for i, tool in enumerate(self.tools or ()):
            parameters = tool.function.parameters
            if parameters is not None:
                check_json_schema(parameters, f"tools.{i}.function.parameters")
                if parameters.get("type", "object") != "object":
                    raise ValueError(f"tools.{i}.function.parameters must be an object schema")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


ChatMessage.model_rebuild()
