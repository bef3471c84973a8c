"""Wire models of Anthropic's POST /v1/messages and POST /v1/messages/count_tokens (request side; answers
are built in serving.py).

Invariants: unknown top-level fields follow the field policy (serve/openai/fields.py: a field Anthropic's SDK
or vLLM's Anthropic server defines that this server does not implement is a 400 naming it, any other is
ignored and logged once); option objects (`tools`, `tool_choice`, `thinking`, `metadata`) are strict;
content blocks accept the extra keys SDKs echo back from earlier answers, but a block a text model cannot
read (image, document, ...) is a 400 naming the block.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from core.config import StrictModel
from serve.openai.chat.protocol import FUNCTION_NAME
from serve.openai.fields import OpenAIRequest
from serve.openai.protocol import StopString, check_json_schema

MAX_STOP_SEQUENCES = 64  # vLLM's VLLM_MAX_STOP_STRINGS default bound for the same field


class _Block(BaseModel):
    """A content block: known fields checked, extra keys (`citations`, `caller`, ...) echoed back by SDKs
    kept aside and ignored. `cache_control` is accepted everywhere: prefix caching is automatic here."""

    model_config = ConfigDict(extra="allow")

    cache_control: dict[str, Any] | None = None


class TextBlock(_Block):
    type: Literal["text"]
    text: str


class ToolUseBlock(_Block):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(_Block):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] | None = None
    is_error: bool | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, content: Any) -> Any:
        _check_block_types(content, ("text",))
        return content

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(block.text for block in self.content)


class ThinkingBlock(_Block):
    """Thinking of an earlier answer, passed back by the client (not shown to the model again)."""

    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(_Block):
    type: Literal["redacted_thinking"]
    data: str


ContentBlock = Annotated[
    TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock,
    Field(discriminator="type"),
]
MESSAGE_BLOCK_TYPES = ("text", "tool_use", "tool_result", "thinking", "redacted_thinking")


def _check_block_types(content: Any, allowed: tuple[str, ...]) -> None:
    """A clear refusal for blocks this server cannot read (before pydantic's union error would)."""
    if not isinstance(content, list):
        return
    for index, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind not in allowed:
            raise ValueError(
                f"block {index} is of type {kind!r}: this server's model reads text only "
                f"(blocks of type {', '.join(map(repr, allowed))})"
            )


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]

    @field_validator("content", mode="before")
    @classmethod
    def _readable_blocks(cls, content: Any) -> Any:
        _check_block_types(content, MESSAGE_BLOCK_TYPES)
        return content


class Tool(StrictModel):
    """A client tool. Anthropic's server tools (`web_search_...`, `bash_...`) are not offered here."""

    name: str
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None
    cache_control: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not FUNCTION_NAME.match(name):
            raise ValueError("a tool name is 1-64 letters, digits, '_', '-', '.' or ':'")
        return name


class ToolChoice(StrictModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None

    @model_validator(mode="after")
    def _name_for_tool(self) -> ToolChoice:
        if (self.type == "tool") != (self.name is not None):
            raise ValueError("name is given exactly when type is 'tool'")
        return self


class ThinkingEnabled(StrictModel):
    type: Literal["enabled"]
    budget_tokens: int = Field(ge=1024)
    display: Literal["summarized", "omitted"] | None = None


class ThinkingDisabled(StrictModel):
    type: Literal["disabled"]


class ThinkingAdaptive(StrictModel):
    type: Literal["adaptive"]
    display: Literal["summarized", "omitted"] | None = None


Thinking = Annotated[ThinkingEnabled | ThinkingDisabled | ThinkingAdaptive, Field(discriminator="type")]


class Metadata(StrictModel):
    user_id: str | None = None


class _Conversation(OpenAIRequest):
    """What a Messages request and a count_tokens request share: the prompt and its tools."""

    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    cache_control: dict[str, Any] | None = None

    @field_validator("system", mode="before")
    @classmethod
    def _text_system(cls, system: Any) -> Any:
        _check_block_types(system, ("text",))
        return system

    @model_validator(mode="after")
    def _tools_consistent(self) -> _Conversation:
        for i, tool in enumerate(self.tools or ()):
            check_json_schema(tool.input_schema, f"tools.{i}.input_schema")
            if tool.input_schema.get("type", "object") != "object":
                raise ValueError(f"tools.{i}.input_schema must be an object schema")
        names = [tool.name for tool in self.tools or ()]
        if len(set(names)) != len(names):
            raise ValueError("tools: tool names must be unique")
        choice = self.tool_choice
        if choice is not None and choice.type == "tool" and choice.name not in names:
            raise ValueError(f"tool_choice names {choice.name!r}, which is not in tools")
        if choice is not None and choice.type == "any" and not names:
            raise ValueError("tool_choice 'any' needs tools")
        return self

    def system_text(self) -> str | None:
        if self.system is None or isinstance(self.system, str):
            return self.system or None
        return "\n".join(block.text for block in self.system) or None


class MessagesRequest(_Conversation):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[StopString] | None = Field(None, max_length=MAX_STOP_SEQUENCES)
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    stream: bool = False
    metadata: Metadata | None = None

    @model_validator(mode="after")
    def _thinking_budget(self) -> MessagesRequest:
        if isinstance(self.thinking, ThinkingEnabled) and self.thinking.budget_tokens >= self.max_tokens:
            raise ValueError("thinking.budget_tokens must be less than max_tokens")
        return self


class CountTokensRequest(_Conversation):
    pass
