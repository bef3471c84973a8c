"""AWQ through llm-compressor: `AWQModifier` smoothing, then asymmetric group quantization (W4A16_ASYM)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantize.config import AwqConfig
from quantize.methods.oneshot import IGNORED_MODULES, run_oneshot, weight_scheme

if TYPE_CHECKING:
    from datasets import Dataset


def recipe(config: AwqConfig) -> list[Any]:
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier

    scheme = weight_scheme(config.bits, config.group_size, symmetric=False)
    return [
        AWQModifier(duo_scaling=config.duo_scaling, n_grid=config.n_grid),
        QuantizationModifier(config_groups={"group_0": scheme}, ignore=IGNORED_MODULES),
    ]


def quantize(source: Path, out: Path, config: AwqConfig, calibration: Dataset | None) -> None:
    """The compressed-tensors AWQ checkpoint of `source`, scales searched on `calibration`, into `out`."""
    run_oneshot(source, out, recipe(config), dataset=calibration, max_seq_len=config.calibration.max_seq_len)
