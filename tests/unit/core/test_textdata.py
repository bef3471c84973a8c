from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import DataError
from core.textdata import BUILTIN_CORPUS, builtin_texts, data_info, load_texts


def test_builtin_splits_are_disjoint_and_nonempty() -> None:
    train, heldout = builtin_texts("train"), builtin_texts("heldout")
    assert len(train) > 100 and len(heldout) > 20
    assert not set(train) & set(heldout)


def test_load_texts_from_files(tmp_path: Path) -> None:
    txt = tmp_path / "data.txt"
    txt.write_text("first paragraph\n\nsecond paragraph\n")
    assert load_texts(txt)[0] == ["first paragraph", "second paragraph"]
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text('{"text": "a"}\n\n{"text": "b"}\n')
    assert load_texts(jsonl)[0] == ["a", "b"]
    assert load_texts(None)[1] == BUILTIN_CORPUS


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", "\n\n", "holds no text"),
        ("bad.jsonl", '{"text": "ok"}\n{oops\n', r"bad\.jsonl:2: not valid JSON"),
        ("field.jsonl", '{"body": "x"}\n', r'field\.jsonl:1: expected an object with a string "text"'),
    ],
)
def test_bad_data_is_reported_with_its_line(tmp_path: Path, name: str, content: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_texts(path)


def test_missing_file() -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_texts("/nonexistent/file.txt")


def test_data_info_digest_changes_with_content() -> None:
    assert data_info("x", ["a"]).digest != data_info("x", ["b"]).digest
