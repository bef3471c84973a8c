"""LoRA leak into base requests (fix 2 of the plugin, see serve/vllm_plugin/__init__.py).

The PyTorch LoRA ops used on CPU (`vllm/lora/ops/torch_ops/lora_ops.py`) gather `weights[indices]`, and a
token without an adapter has index -1, which picks the *last* adapter slot: a base request batched with
adapter requests silently gets that adapter applied. The fix wraps the three `bgmv_*` ops (the `sgmv_*`
prefill ops delegate to them) so that no-adapter rows contribute exactly zero, as the Triton kernels' early
exit does (upstream vllm-project/vllm#48421). Valid indices are untouched, so adapter outputs are
bit-for-bit unchanged. The fix probes the installed ops first and does nothing if they already skip -1:
remove it once the installed vLLM ships #48421.
"""

from __future__ import annotations

import functools
import importlib
import logging
import sys
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

LORA_OPS_MODULE = "vllm.lora.ops.torch_ops.lora_ops"
# Modules that bind the ops by name (`from ... import bgmv_expand`) and so need the fixed function too.
LORA_OPS_IMPORTERS = ("vllm.lora.ops.torch_ops", "vllm.lora.punica_wrapper.punica_cpu")
BGMV_OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")
FIXED_MARK = "__llmstack_skips_no_lora__"


def skip_no_lora_rows(op: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a torch `bgmv_*` op `(inputs, weights, output, indices, ...)` so rows with index < 0 add nothing.

    Such rows get zero inputs and a valid (clamped) gather index, so their product with any adapter is
    exactly zero; rows with a valid index see identical inputs and indices.
    """
    import torch

    @functools.wraps(op)
    def fixed(
        inputs: torch.Tensor,
        lora_weights: torch.Tensor,
        output_tensor: torch.Tensor,
        lora_indices_tensor: torch.Tensor,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        # No data-dependent branch ("skip if no index is -1"): the op must stay traceable by torch.compile.
        no_lora = (lora_indices_tensor < 0).unsqueeze(-1)
        inputs = torch.where(no_lora, torch.zeros((), dtype=inputs.dtype), inputs)
        return op(inputs, lora_weights, output_tensor, lora_indices_tensor.clamp(min=0), *args, **kwargs)

    setattr(fixed, FIXED_MARK, True)
    return fixed


def ops_leak(bgmv_shrink: Callable[..., Any]) -> bool:
    """True if `bgmv_shrink` applies an adapter to a row whose index is -1 (the upstream bug)."""
    import torch

    weights = torch.ones(2, 1, 1, 2)  # two adapter slots, rank 1, hidden 2
    out = torch.zeros(1, 1)
    bgmv_shrink(torch.ones(1, 2), weights, out, torch.tensor([-1]), 1.0)
    return bool(out.abs().sum() > 0)


def fix_lora_no_adapter_rows() -> bool:
    """Install `skip_no_lora_rows` around the CPU LoRA ops of this process. True if the fix is in place.

    Idempotent; does nothing when vLLM is absent or its ops already skip index -1.
    """
    try:
        ops = importlib.import_module(LORA_OPS_MODULE)
    except ImportError:
        return False
    if getattr(ops.bgmv_shrink, FIXED_MARK, False):
        return True
    if not ops_leak(ops.bgmv_shrink):
        log.info("vLLM's CPU LoRA ops already skip no-adapter rows: the plugin's LoRA fix can be removed")
        return False
    fixed = {name: skip_no_lora_rows(getattr(ops, name)) for name in BGMV_OPS}
    for module in (ops, *(sys.modules.get(name) for name in LORA_OPS_IMPORTERS)):
        if module is None:
            continue
        for name, function in fixed.items():
            if hasattr(module, name):
                setattr(module, name, function)
    return True
