"""The `Engine` protocol: what the HTTP layer needs from an inference engine.

Invariant: the engine works on token ids and returns deltas; it knows nothing about HTTP, chat templates or
the OpenAI wire format. Sampling is described by vLLM's `SamplingParams` and adapters by `LoRARequest` (both
plain data classes), so the protocol adds no parallel vocabulary.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest


@dataclass(frozen=True)
class TokenLogprob:
    """One token with its log-probability and the most likely alternatives (best first) as
    (token id, token text, log-probability)."""

    token_id: int
    token: str
    logprob: float
    top: tuple[tuple[int, str, float], ...]


@dataclass(frozen=True)
class ChoiceDelta:
    """What one sequence (`index` < n) produced since the previous output of its request.

    `stop_reason` says why a `"stop"` finish happened: None for the end-of-sequence token, the stop string
    or the stop token id otherwise (as vLLM reports it)."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] | None
    finish_reason: str | None
    stop_reason: str | int | None = None


@dataclass(frozen=True)
class TokenTiming:
    """Engine-side timing of a request, for outputs that are not streamed token by token:
    `first_token_latency` from the engine's arrival, and the span from first to last token."""

    first_token_latency: float
    decode_seconds: float


@dataclass(frozen=True)
class EngineOutput:
    """One step of a request: deltas for the sequences that advanced; `finished` on the last one.

    `prompt_logprobs` (first output only, when asked for) has one entry per prompt token, None for the
    first token (nothing predicts it). `cached_tokens`: how many prompt tokens the engine's prefix cache
    already held (None where the engine does not say)."""

    prompt_tokens: int
    choices: tuple[ChoiceDelta, ...]
    finished: bool
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    timing: TokenTiming | None = None
    cached_tokens: int | None = None  # prompt tokens found in the prefix cache (None: not said)


class Engine(Protocol):
    """An async inference engine serving one base model and, optionally, LoRA adapters on it."""

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase: ...

    @property
    def max_model_len(self) -> int: ...

    @property
    def default_sampling(self) -> dict[str, Any]:
        """Sampling defaults from the model's `generation_config.json` (vLLM's names: temperature, top_p,
        top_k, min_p, repetition_penalty, max_tokens); a request's own values win over these."""
        ...

    def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        lora: LoRARequest | None = None,
    ) -> AsyncGenerator[EngineOutput, None]:
        """Outputs of the request until finished: deltas if `params.output_kind` is DELTA, else one final
        output. Closing the iterator early aborts the request."""
        ...

    async def abort(self, request_id: str) -> None:
        """Stop a request (idempotent; unknown ids are ignored)."""

    async def add_lora(self, lora: LoRARequest) -> bool: ...

    async def remove_lora(self, lora_id: int) -> bool: ...

    async def check_health(self) -> None:
        """Raise if the engine is dead."""

    def kv_cache_usage(self) -> float | None:
        """Fraction of the KV cache in use at the last scheduler step, if the engine reports it."""
        ...

    def shutdown(self) -> None: ...
