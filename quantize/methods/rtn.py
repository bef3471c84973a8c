"""Round-to-nearest through llm-compressor's `QuantizationModifier` (min-max observer, no calibration data):
the honest baseline, in the same compressed-tensors format as AWQ and GPTQ."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantize.config import RtnConfig
from quantize.methods.oneshot import IGNORED_MODULES, run_oneshot, weight_scheme

if TYPE_CHECKING:
    from datasets import Dataset


def recipe(config: RtnConfig) -> list[Any]:
    from llmcompressor.modifiers.quantization import QuantizationModifier

    scheme = weight_scheme(config.bits, config.group_size, symmetric=config.symmetric)
    return [QuantizationModifier(config_groups={"group_0": scheme}, ignore=IGNORED_MODULES)]


def quantize(source: Path, out: Path, config: RtnConfig, calibration: Dataset | None) -> None:
    """The compressed-tensors RTN checkpoint of `source` into `out`; data-free, so `calibration` (None for an
    `RtnConfig`) is not used."""
    run_oneshot(source, out, recipe(config), dataset=None)
