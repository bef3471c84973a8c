"""The shared llm-compressor path of AWQ, GPTQ and RTN: recipe in, compressed-tensors folder out.

Invariant: the output folder holds exactly what vLLM and transformers load (`pack-quantized` int32 weights,
scales, zero points, `quantization_config` in config.json, tokenizer and chat template); `lm_head` and the
embeddings stay in the source dtype.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.models import load_causal_lm, load_tokenizer

if TYPE_CHECKING:
    from datasets import Dataset

log = logging.getLogger(__name__)
IGNORED_MODULES = ["lm_head"]


def weight_scheme(bits: int, group_size: int, *, symmetric: bool) -> dict[str, Any]:
    """A compressed-tensors config group: integer weights in groups of `group_size` input channels on every
    Linear layer, activations untouched (W{bits}A16)."""
    return {
        "targets": ["Linear"],
        "weights": {
            "num_bits": bits,
            "type": "int",
            "symmetric": symmetric,
            "strategy": "group",
            "group_size": group_size,
        },
    }


@contextlib.contextmanager
def _cpu_without_pinned_memory() -> Iterator[None]:
    """llm-compressor's AWQ pins cached activations for fast host-to-device copies; pinning needs an
    accelerator, so without one the pin is a no-op for the duration of the run."""
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.accelerator.is_available():
        yield
        return
    original = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = original  # type: ignore[method-assign]


def run_oneshot(
    source: Path, out: Path, recipe: list[Any], *, dataset: Dataset | None, max_seq_len: int = 512
) -> None:
    """Load `source`, apply `recipe` (calibrating layer by layer on `dataset`, or data-free when it is None)
    and save the compressed model with its tokenizer into `out`."""
    from llmcompressor import oneshot

    options: dict[str, Any] = {"pipeline": "datafree"}
    if dataset is not None:
        options = {
            "pipeline": "sequential",
            "dataset": dataset,
            "num_calibration_samples": len(dataset),
            "max_seq_length": max_seq_len,
            "shuffle_calibration_samples": False,
        }
    model, tokenizer = load_causal_lm(source), load_tokenizer(source)
    with _cpu_without_pinned_memory():
        oneshot(model=model, recipe=recipe, tokenizer=tokenizer, **options)
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)
    log.info("wrote compressed-tensors model to %s", out)
