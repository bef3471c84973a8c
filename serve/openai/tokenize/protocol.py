"""Wire models of vLLM's POST /tokenize and POST /detokenize (same fields and answers as vLLM's server)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Discriminator, Field, Tag, TypeAdapter

from serve.openai.chat.protocol import ChatMessage, ToolDefinition


class TokenizeCompletionRequest(BaseModel):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(BaseModel):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[ToolDefinition] | None = None
    return_token_strs: bool = False


def _kind(body: Any) -> str:
    """vLLM tells its two tokenize bodies apart by `messages`."""
    return "chat" if isinstance(body, dict) and "messages" in body else "prompt"


TokenizeRequest = TypeAdapter(
    Annotated[
        Annotated[TokenizeChatRequest, Tag("chat")] | Annotated[TokenizeCompletionRequest, Tag("prompt")],
        Discriminator(_kind),
    ]
)


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str
