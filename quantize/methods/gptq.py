"""GPTQ through llm-compressor: `GPTQModifier`, symmetric group quantization (W4A16)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantize.config import GptqConfig
from quantize.methods.oneshot import IGNORED_MODULES, run_oneshot, weight_scheme

if TYPE_CHECKING:
    from datasets import Dataset


def recipe(config: GptqConfig) -> list[Any]:
    from llmcompressor.modifiers.gptq import GPTQModifier

    return [
        GPTQModifier(
            config_groups={"group_0": weight_scheme(config.bits, config.group_size, symmetric=True)},
            ignore=IGNORED_MODULES,
            block_size=config.block_size,
            dampening_frac=config.dampening_frac,
        )
    ]


def quantize(source: Path, out: Path, config: GptqConfig, calibration: Dataset | None) -> None:
    """The compressed-tensors GPTQ checkpoint of `source`, rounding corrected on `calibration`, into `out`."""
    run_oneshot(source, out, recipe(config), dataset=calibration, max_seq_len=config.calibration.max_seq_len)
