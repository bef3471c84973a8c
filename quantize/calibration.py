"""Calibration and evaluation samples, tokenized.

Invariant: the samples a method used are exactly those recorded in the manifest (`DataInfo` digest over the
texts after truncation to `num_samples`); an empty source is refused before any model is loaded.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from core.artifact import DataInfo
from core.errors import DataError
from core.textdata import load_texts

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)
HF_PREFIX = "hf:"


def load_samples(source: str | None, *, split: str, limit: int) -> tuple[list[str], str]:
    """At most `limit` non-empty texts and a display name. `source`: a file, `hf:NAME[:SPLIT]`, or None for
    the built-in corpus' `split` ('train' for calibration, 'heldout' for evaluation)."""
    if source is not None and source.startswith(HF_PREFIX):
        texts, name = _load_hub_dataset(source.removeprefix(HF_PREFIX))
    else:
        texts, name = load_texts(source, split=split)
    texts = [t for t in texts if t.strip()][:limit]
    if not texts:
        raise DataError(f"data source {name} holds no text")
    return texts, name


def _load_hub_dataset(spec: str) -> tuple[list[str], str]:
    import datasets

    name, _, split = spec.partition(":")
    try:
        dataset = datasets.load_dataset(name, split=split or "train")
    except Exception as err:  # the library raises many kinds (offline, missing, gated)
        raise DataError(f"cannot load dataset {name!r}: {str(err).splitlines()[0]}") from None
    if "text" not in dataset.column_names:
        raise DataError(f"dataset {name!r} has no 'text' column (columns: {', '.join(dataset.column_names)})")
    return [str(t) for t in dataset["text"]], f"{HF_PREFIX}{spec}"


def tokenize(texts: list[str], tokenizer: PreTrainedTokenizerBase, max_seq_len: int) -> list[list[int]]:
    """Token ids per text, truncated to `max_seq_len`; texts of fewer than 2 tokens are dropped."""
    encoded = tokenizer(texts, truncation=True, max_length=max_seq_len, add_special_tokens=False)
    return [ids for ids in encoded["input_ids"] if len(ids) >= 2]


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
