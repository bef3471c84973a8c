"""Wire models of POST /v1/completions (request side; responses are built in serving.py)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from serve.openai.chat.protocol import StopSequences, StreamOptions


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stop: StopSequences | None = None
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logprobs: int | None = Field(None, ge=0, le=5)
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
