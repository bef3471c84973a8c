"""Wire models of POST /v1/completions (request side; responses are built in serving.py).

Invariant: unknown fields follow the field policy (serve/openai/fields.py): OpenAI's `suffix` and
`best_of`, which this server does not implement, are 400s naming them.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from serve.openai.protocol import MAX_LOGPROBS, SamplingFields, StreamOptions

TokenId = Annotated[int, Field(ge=0)]


class CompletionRequest(SamplingFields):
    model: str
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    max_tokens: int | None = Field(16, ge=0, description="0 with echo: score the prompt only")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM's extensions
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_special_tokens: bool = True
    truncate_prompt_tokens: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> CompletionRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options needs stream: true")
        return self
