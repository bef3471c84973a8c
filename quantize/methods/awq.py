"""AWQ through llm-compressor: `AWQModifier` smoothing, then asymmetric group quantization (W4A16_ASYM)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantize.config import AwqConfig
from quantize.methods.oneshot import IGNORED_MODULES, run_oneshot, weight_scheme

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def recipe(config: AwqConfig) -> list[Any]:
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier

    scheme = weight_scheme(config.bits, config.group_size, symmetric=False)
    return [
        AWQModifier(duo_scaling=config.duo_scaling, n_grid=config.n_grid),
        QuantizationModifier(config_groups={"group_0": scheme}, ignore=IGNORED_MODULES),
    ]


def quantize(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    out: Path,
    config: AwqConfig,
) -> None:
    calibration = config.calibration
    run_oneshot(model, tokenizer, recipe(config), out, dataset=dataset, max_seq_len=calibration.max_seq_len)
