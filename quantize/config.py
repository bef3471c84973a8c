"""Strict configuration models of the toolchain, one per method (llm-compressor style).

Invariant: every model forbids unknown keys and validates its values before any model is loaded; a method
config's fields are its command's options (`quantize.cli` makes them), their descriptions the options' help
and the config's docstring the command's help, so a setting is declared and documented in exactly one place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final, Literal, TypeVar

from pydantic import BaseModel, Field, field_validator, model_validator

from core.config import StrictModel, validate_config
from core.quality import SUPPORTED_BITS, WeightBits

COMPRESSED_TENSORS: Final = "compressed-tensors"
BITSANDBYTES: Final = "bitsandbytes"
GPTQMODEL_AWQ_GRID: Final = 20  # gptqmodel's AWQ scale search: fixed grid, always duo scaling
GPTQMODEL_GPTQ_BLOCK: Final = 128  # gptqmodel's GPTQ: fixed block of columns


class CalibrationConfig(StrictModel):
    """Text that the calibrated methods (AWQ, GPTQ) run through the model."""

    calib_data: str | None = Field(
        default=None,
        description="Calibration text: a .txt file (blank-line-separated paragraphs), a .jsonl file with a "
        "'text' field, or hf:NAME[:SPLIT] (a `datasets` dataset, needs network). "
        "Default: the built-in corpus (Python's pydoc topics, training split).",
    )
    num_samples: int = Field(default=128, ge=1, description="Calibration samples used (at most).")
    max_seq_len: int = Field(default=512, ge=8, description="Tokens per calibration sample (truncated).")


class MethodConfig(StrictModel):
    """A quantization method's settings; every method names the checkpoint format it writes, and
    `quantize.methods.METHODS` has one writer for each format a config's `format` field admits."""

    format: str


class WeightQuantConfig(MethodConfig):
    """Integer weight-only quantization (activations stay 16-bit: W4A16 / W8A16)."""

    bits: WeightBits = Field(
        default=4, description=f"Weight bits; supported: {', '.join(map(str, SUPPORTED_BITS))}."
    )
    group_size: int = Field(
        default=128, ge=1, description="Input channels sharing one scale (and zero point)."
    )


class CalibratedConfig(WeightQuantConfig):
    """Integer weight quantization fitted on calibration text run through the model (AWQ, GPTQ)."""

    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)


class AwqConfig(CalibratedConfig):
    """AWQ (activation-aware channel scaling, then asymmetric groups) to compressed-tensors (llm-compressor
    `AWQModifier`) or the classic AutoAWQ GEMM format (gptqmodel); vLLM and transformers load both."""

    duo_scaling: bool = Field(
        default=True, description="Search scales with both activation and weight magnitudes."
    )
    n_grid: int = Field(default=20, ge=1, description="Grid points of the per-layer scale search.")
    format: Literal["compressed-tensors", "awq"] = Field(
        default=COMPRESSED_TENSORS,
        description="Checkpoint format: compressed-tensors (llm-compressor) or awq (the classic AutoAWQ GEMM "
        "layout, written by gptqmodel; 4-bit only).",
    )

    @model_validator(mode="after")
    def _classic_format_limits(self) -> AwqConfig:
        if self.format == "awq":
            if self.bits != 4:
                raise ValueError(f"format 'awq' stores 4-bit weights only (got {self.bits} bits)")
            if not self.duo_scaling or self.n_grid != GPTQMODEL_AWQ_GRID:
                raise ValueError(
                    f"format 'awq' (gptqmodel) always uses duo scaling and a {GPTQMODEL_AWQ_GRID}-point grid"
                )
        return self


class GptqConfig(CalibratedConfig):
    """GPTQ (Hessian-based error-correcting rounding, symmetric groups) to compressed-tensors (llm-compressor
    `GPTQModifier`) or the classic AutoGPTQ format (gptqmodel); vLLM and transformers load both."""

    dampening_frac: float = Field(
        default=0.01, gt=0, lt=1, description="Hessian dampening, fraction of its mean diagonal."
    )
    block_size: int = Field(default=128, ge=1, description="Columns quantized per GPTQ block.")
    format: Literal["compressed-tensors", "gptq"] = Field(
        default=COMPRESSED_TENSORS,
        description="Checkpoint format: compressed-tensors (llm-compressor) or gptq (the classic AutoGPTQ "
        "layout, written by gptqmodel).",
    )

    @model_validator(mode="after")
    def _classic_format_limits(self) -> GptqConfig:
        if self.format == "gptq" and self.block_size != GPTQMODEL_GPTQ_BLOCK:
            raise ValueError(
                f"format 'gptq' (gptqmodel) always quantizes blocks of {GPTQMODEL_GPTQ_BLOCK} columns"
            )
        return self


class RtnConfig(WeightQuantConfig):
    """Round-to-nearest (min-max groups, no calibration data): the baseline AWQ and GPTQ are measured
    against, in their compressed-tensors format."""

    symmetric: bool = Field(
        default=False, description="Symmetric groups (no zero point); default asymmetric like AWQ."
    )
    format: Literal["compressed-tensors"] = Field(
        default=COMPRESSED_TENSORS, description="Checkpoint format: compressed-tensors (llm-compressor)."
    )


class Nf4Config(MethodConfig):
    """bitsandbytes 4-bit NormalFloat weights (transformers `BitsAndBytesConfig`), saved pre-quantized;
    transformers loads them (vLLM: on a GPU only)."""

    double_quant: bool = Field(
        default=True, description="Quantize the per-block scales too (saves ~0.4 bit/weight)."
    )
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        default="bfloat16", description="Dtype the 4-bit weights are dequantized to for matmuls."
    )
    format: Literal["bitsandbytes"] = Field(
        default=BITSANDBYTES, description="Checkpoint format: bitsandbytes (pre-quantized 4-bit weights)."
    )


class MergeLoraConfig(StrictModel):
    """Fold LoRA adapters into a full-precision base (PEFT `merge_and_unload`)."""

    adapters: list[Path] = Field(min_length=1, description="Adapter folders (PEFT format), merged in order.")
    weights: list[float] | None = Field(
        default=None, description="One weight per adapter (default 1.0 each): W += Σ weight_i · ΔW_i."
    )
    force: bool = Field(
        default=False,
        description="Allow a quantized base: it is dequantized first, so its quantization error stays in the "
        "merged weights (merge into the full-precision base instead whenever it exists).",
    )

    @field_validator("weights")
    @classmethod
    def _finite(cls, weights: list[float] | None) -> list[float] | None:
        if weights is not None and not all(abs(w) < float("inf") for w in weights):
            raise ValueError("adapter weights must be finite")
        return weights

    @model_validator(mode="after")
    def _one_weight_per_adapter(self) -> MergeLoraConfig:
        if self.weights is not None and len(self.weights) != len(self.adapters):
            raise ValueError(f"{len(self.weights)} weights given for {len(self.adapters)} adapters")
        return self


C = TypeVar("C", bound=BaseModel)


def validated(model: type[C], **values: object) -> C:
    """Build a config, turning every validation problem into one `ConfigError` line."""
    return validate_config(model, values)
