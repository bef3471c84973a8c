"""NF4 through bitsandbytes: transformers quantizes while loading, and the 4-bit weights are saved as such."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from core.models import load_causal_lm, load_tokenizer
from quantize.config import Nf4Config

if TYPE_CHECKING:
    from datasets import Dataset

log = logging.getLogger(__name__)


def quantize(source: Path, out: Path, config: Nf4Config, calibration: Dataset | None) -> None:
    """Load `source` with a 4-bit NormalFloat `BitsAndBytesConfig` and save it pre-quantized into `out`;
    data-free, so `calibration` (None for an `Nf4Config`) is not used."""
    import torch
    from transformers import BitsAndBytesConfig

    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=config.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, config.compute_dtype),
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_causal_lm(source, quantization_config=bnb, device_map=device)
    model.save_pretrained(out)
    load_tokenizer(source).save_pretrained(out)
    log.info("wrote NF4 model to %s", out)
