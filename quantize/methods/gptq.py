"""GPTQ through llm-compressor: `GPTQModifier`, symmetric group quantization (W4A16)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantize.config import GptqConfig
from quantize.methods.oneshot import IGNORED_MODULES, run_oneshot, weight_scheme

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


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


def quantize(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    out: Path,
    config: GptqConfig,
) -> None:
    calibration = config.calibration
    run_oneshot(model, tokenizer, recipe(config), out, dataset=dataset, max_seq_len=calibration.max_seq_len)
