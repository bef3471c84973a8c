"""Text samples for calibration, evaluation and training.

Invariant: the built-in corpus (Python's own `pydoc_data.topics`, so it exists offline on every machine) is
split deterministically; calibration/training samples never overlap the held-out evaluation samples.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from core.artifact import DataInfo, texts_digest
from core.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

BUILTIN_CORPUS = "builtin:pydoc-topics"
_HELD_OUT_EVERY = 5  # one paragraph in five is held out for evaluation


def _builtin_paragraphs() -> list[str]:
    """Unique paragraphs (>= 80 characters) of `pydoc_data.topics`, in a stable order."""
    from pydoc_data.topics import topics

    seen: dict[str, None] = {}
    for _, text in sorted(topics.items()):
        for paragraph in text.split("\n\n"):
            if len(paragraph.strip()) >= 80:
                seen.setdefault(paragraph.strip(), None)
    return list(seen)


def builtin_texts(split: str) -> list[str]:
    """Paragraph samples of the built-in corpus; `split` is 'train' or 'heldout'. A paragraph's split is
    decided by its own hash, so the two splits are disjoint even where topics repeat text."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    want_held_out = split == "heldout"
    return [
        p
        for p in _builtin_paragraphs()
        if (int(hashlib.sha256(p.encode()).hexdigest(), 16) % _HELD_OUT_EVERY == 0) == want_held_out
    ]


def load_texts(source: str | Path | None, *, split: str = "train") -> tuple[list[str], str]:
    """Samples and a display name from a file (`.txt`: blank-line-separated paragraphs; `.jsonl`: a "text"
    field per line) or the built-in corpus when `source` is None or `builtin:pydoc-topics`."""
    if source is None or str(source) == BUILTIN_CORPUS:
        return builtin_texts(split), BUILTIN_CORPUS
    path = Path(source)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(f'{path}:{number}: expected an object with a string "text" field')
            texts.append(record["text"])
    else:
        texts = [p.strip() for p in raw.split("\n\n") if p.strip()]
    if not texts:
        raise DataError(f"data file {path} holds no text")
    return texts, str(path)


def data_info(name: str, texts: list[str], num_tokens: int | None = None) -> DataInfo:
    """The manifest record of a set of samples as used."""
    return DataInfo(name=name, digest=texts_digest(texts), num_samples=len(texts), num_tokens=num_tokens)


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
