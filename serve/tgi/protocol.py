"""Wire models of TGI's generate API (the request side; answers are built in serving.py).

Invariants: every TGI parameter is either honoured or refused with a 422 that names it (vLLM has no
watermarking, no typical-p sampling and, in 0.32, no best-of); unknown parameters are refused, as TGI does.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from core.config import StrictModel
from serve.openai.protocol import MAX_LOGPROBS, StopString

MAX_STOP_SEQUENCES = 16  # what /info announces, enforced here


class Grammar(StrictModel):
    type: Literal["json", "json_schema", "regex"]
    value: Any


class Parameters(StrictModel):
    """TGI's `parameters` object; a null value means "not set", as huggingface_hub sends it."""

    adapter_id: str | None = None
    best_of: int | None = Field(None, ge=1)
    decoder_input_details: bool = False
    details: bool = False
    do_sample: bool = False
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    grammar: Grammar | None = None
    max_new_tokens: int | None = Field(None, ge=1)
    repetition_penalty: float | None = Field(None, gt=0)
    return_full_text: bool | None = None
    seed: int | None = Field(None, ge=0, le=2**64 - 1)
    stop: list[StopString] = Field(default_factory=list, max_length=MAX_STOP_SEQUENCES)
    temperature: float | None = Field(None, gt=0)
    top_k: int | None = Field(None, gt=0)
    top_n_tokens: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    top_p: float | None = Field(None, gt=0, lt=1)
    truncate: int | None = Field(None, ge=1)
    typical_p: float | None = Field(None, gt=0, le=1)
    watermark: bool = False

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_unset(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data

    @model_validator(mode="after")
    def _what_vllm_can(self) -> Parameters:
        if self.watermark:
            raise ValueError("watermark: the vLLM engine behind this server does not watermark")
        if self.best_of is not None and self.best_of > 1:
            raise ValueError("best_of: only 1 is supported (vLLM 0.32 removed best-of sampling)")
        if self.typical_p is not None and self.typical_p < 1:
            raise ValueError("typical_p: typical sampling is not supported by the vLLM engine")
        return self

    def samples(self) -> bool:
        """TGI samples when asked to, or when any sampling parameter is set; otherwise it is greedy."""
        return self.do_sample or any(v is not None for v in (self.temperature, self.top_k, self.top_p))


class GenerateRequest(StrictModel):
    inputs: str = Field(min_length=1)
    parameters: Parameters = Field(default_factory=Parameters)
    stream: bool = False
