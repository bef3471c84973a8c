"""Calibration/evaluation samples: files, limits, the built-in default, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.errors import DataError
from core.textdata import BUILTIN_CORPUS, builtin_texts, load_samples
from quantize.calibration import calibration_dataset


def test_builtin_default_is_the_training_split() -> None:
    texts, name = load_samples(None, split="train", limit=5)
    assert name == BUILTIN_CORPUS and texts == builtin_texts("train")[:5]
    held, _ = load_samples(None, split="heldout", limit=1000)
    assert not set(held) & set(builtin_texts("train"))


def test_jsonl_file_and_limit(tmp_path: Path) -> None:
    path = tmp_path / "calib.jsonl"
    path.write_text("".join(json.dumps({"text": f"sample {i}"}) + "\n" for i in range(10)))
    texts, name = load_samples(str(path), split="train", limit=3)
    assert texts == ["sample 0", "sample 1", "sample 2"] and name == str(path)


@pytest.mark.parametrize("content", ["", "\n\n", '{"text": "   "}\n'])
def test_empty_sources_are_refused(tmp_path: Path, content: str) -> None:
    path = tmp_path / ("calib.jsonl" if content.startswith("{") else "calib.txt")
    path.write_text(content)
    with pytest.raises(DataError, match="holds no text"):
        load_samples(str(path), split="train", limit=8)


def test_offline_hub_dataset_is_one_clear_error() -> None:
    with pytest.raises(DataError, match="cannot load dataset 'no-such/dataset'"):
        load_samples("hf:no-such/dataset", split="train", limit=8)


def test_dataset_records_what_was_used(tiny_model_dir: Path) -> None:
    from core.models import load_tokenizer

    texts, name = load_samples(None, split="train", limit=4)
    dataset, info = calibration_dataset(texts, name, load_tokenizer(tiny_model_dir), max_seq_len=16)
    assert len(dataset) == 4 and all(len(ids) <= 16 for ids in dataset["input_ids"])
    assert info.num_samples == 4 and info.num_tokens == sum(len(ids) for ids in dataset["input_ids"])
