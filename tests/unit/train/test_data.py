"""Chat data: assistant-only targets under the model's template; bad records reported by line number."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import DataError
from core.models import load_tokenizer
from tests.unit.train.conftest import chat_records, write_jsonl
from train.data import IGNORE_INDEX, collate, load_chat_jsonl, render_with_mask


def test_only_assistant_turns_are_targets(tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a keyword."},
        {"role": "assistant", "content": "lambda"},
        {"role": "user", "content": "Another one."},
        {"role": "assistant", "content": "yield it"},
    ]
    text, example = render_with_mask(tokenizer, messages)
    assert tokenizer.decode(example.input_ids) == text  # one tokenization of the whole rendered text
    targets = [t for t in example.labels if t != IGNORE_INDEX]
    assert tokenizer.decode(targets) == "lambda<|im_end|>yield it<|im_end|>"
    # the prompt tokens (system, user, role headers) are all masked
    first_target = next(i for i, t in enumerate(example.labels) if t != IGNORE_INDEX)
    assert tokenizer.decode(example.input_ids[:first_target]).endswith("<|im_start|>assistant\n")


def test_bad_records_are_reported_with_line_numbers_and_skipped(tiny_model_dir: Path, tmp_path: Path) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    good = chat_records(3)
    long = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "word " * 400}]}
    lines = [
        good[0],
        "{not json",
        {"messages": [{"role": "user", "content": "no answer"}]},
        good[1],
        long,
        {"messages": [{"role": "wizard", "content": "?"}, {"role": "assistant", "content": "a"}]},
        {"text": "wrong shape"},
        good[2],
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", lines)
    data = load_chat_jsonl(path, tokenizer, max_length=128, on_bad="skip")
    assert len(data.examples) == 3
    where = [p.split(": ")[0] for p in data.problems]
    assert where == [f"{path}:{n}" for n in (2, 3, 5, 6, 7)]
    assert "not valid JSON" in data.problems[0]
    assert "no assistant turn" in data.problems[1]
    assert "longer than max_length=128" in data.problems[2]
    with pytest.raises(DataError, match=r"5 bad record\(s\).*mixed.jsonl:2: .*mixed.jsonl:7: "):
        load_chat_jsonl(path, tokenizer, max_length=128, on_bad="refuse")


def test_collate_pads_right_without_targets(tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    examples = [render_with_mask(tokenizer, r["messages"])[1] for r in chat_records(2)]
    examples[1] = type(examples[1])(examples[1].input_ids[:5], examples[1].labels[:5])
    batch = collate(examples, pad_id=0)
    assert batch["input_ids"].shape == (2, len(examples[0].input_ids))
    assert batch["attention_mask"][1].sum() == 5
    assert (batch["labels"][1, 5:] == IGNORE_INDEX).all()
