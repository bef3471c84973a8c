"""Calibration samples for the calibrated methods (AWQ, GPTQ), tokenized (the loaders are core.textdata's).

Invariant: the samples a method used are exactly those recorded in the manifest (`DataInfo` digest over the
texts after truncation to `num_samples`); an empty source is refused before any model is loaded.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from core.artifact import DataInfo
from core.errors import DataError
from core.textdata import tokenize

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


def calibration_dataset(
    texts: list[str], name: str, tokenizer: PreTrainedTokenizerBase, max_seq_len: int
) -> tuple[Dataset, DataInfo]:
    """A tokenized `datasets.Dataset` for llm-compressor and the manifest record of what it holds."""
    from datasets import Dataset

    from core.textdata import data_info

    ids = tokenize(texts, tokenizer, max_seq_len)
    if not ids:
        raise DataError(f"calibration data {name} yields no sample of 2 tokens or more")
    dataset = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids]})
    info = data_info(name, texts, num_tokens=sum(len(i) for i in ids))
    log.info("calibration: %d samples, %d tokens from %s", len(ids), info.num_tokens, name)
    return dataset, info
