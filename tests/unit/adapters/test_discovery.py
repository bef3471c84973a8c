from __future__ import annotations

from pathlib import Path

import pytest

from adapters.discovery import collect, discover_directory, parse_spec, read_registry_file
from core.errors import ConfigError


def _adapter_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text("{}")
    return path


def test_parse_spec_makes_the_path_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    spec = parse_spec("sql=adapters/sql")
    assert spec.name == "sql"
    assert spec.path == tmp_path / "adapters" / "sql"


@pytest.mark.parametrize("bad", ["noequals", "=path", "name=", "bad name=/x", "a/b=/x"])
def test_parse_spec_refuses_malformed_specs(bad: str) -> None:
    with pytest.raises(ConfigError, match="--lora-modules"):
        parse_spec(bad)


def test_directory_discovery_takes_only_adapter_folders(tmp_path: Path) -> None:
    _adapter_folder(tmp_path / "b-adapter")
    _adapter_folder(tmp_path / "a-adapter")
    (tmp_path / "not-an-adapter").mkdir()
    (tmp_path / "file.txt").write_text("x")
    specs = discover_directory(tmp_path)
    assert [(s.name, s.path) for s in specs] == [
        ("a-adapter", tmp_path / "a-adapter"),
        ("b-adapter", tmp_path / "b-adapter"),
    ]


def test_registry_file_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    registry = tmp_path / "conf" / "adapters.yaml"
    registry.parent.mkdir()
    registry.write_text(
        "adapters:\n  - name: one\n    path: ../weights/one\n  - name: two\n    path: /abs/two\n"
    )
    specs = read_registry_file(registry)
    assert [(s.name, s.path) for s in specs] == [
        ("one", tmp_path / "weights" / "one"),
        ("two", Path("/abs/two")),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("adapters:\n  - name: x\n", "path"),
        ("adapters:\n  - name: x\n    path: /p\n    rank: 8\n", "rank"),
        ("adaptors: []\n", "adaptors"),
        ("adapters: [\n", "cannot read"),
    ],
)
def test_registry_file_errors_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    registry = tmp_path / "adapters.yaml"
    registry.write_text(text)
    with pytest.raises(ConfigError, match=message):
        read_registry_file(registry)


def test_collect_reports_every_problem_together(tmp_path: Path) -> None:
    _adapter_folder(tmp_path / "dir" / "dup")
    with pytest.raises(ConfigError) as err:
        collect(["dup=/x", "broken"], [tmp_path / "dir", tmp_path / "missing"])
    message = str(err.value)
    assert "expected name=path, got 'broken'" in message
    assert "missing does not exist" in message
    assert "'dup' given twice" in message


def test_collect_keeps_the_order_of_sources(tmp_path: Path) -> None:
    _adapter_folder(tmp_path / "dir" / "b")
    registry = tmp_path / "r.yaml"
    registry.write_text("adapters:\n  - {name: c, path: /c}\n")
    assert [s.name for s in collect(["a=/a"], [tmp_path / "dir"], [registry])] == ["a", "b", "c"]
