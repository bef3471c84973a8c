"""ServeSettings and its generated flags: parsing, environment, refusals, and `serve --help`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from serve.settings import ServeSettings, build_parser, parse_keys_file, parse_settings

REPO = Path(__file__).resolve().parents[3]
GOOD_KEY = "a-real-looking-key-0123"


def test_defaults() -> None:
    settings = parse_settings([])
    assert (settings.host, settings.port, settings.tensor_parallel_size) == ("127.0.0.1", 8000, 1)
    assert settings.model is None and settings.api_key == [] and not settings.lora_enabled()


def test_flags_override_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LLMSTACK_PORT", "9001")
    monkeypatch.setenv("LLMSTACK_MAX_LORAS", "7")
    settings = parse_settings(["--port", "9002", "--dtype", "float32", "--no-enforce-eager"])
    assert settings.port == 9002 and settings.max_loras == 7
    assert settings.dtype == "float32" and settings.enforce_eager is False


def test_list_flags_accept_repeats_and_several_values(tmp_path: Path) -> None:
    settings = parse_settings(
        [
            "--api-key",
            GOOD_KEY,
            "--api-key",
            GOOD_KEY + "b",
            "--lora-modules",
            f"a={tmp_path}",
            f"b={tmp_path}",
        ]
    )
    assert [k.get_secret_value() for k in settings.api_key] == [GOOD_KEY, GOOD_KEY + "b"]
    assert list(settings.adapters()) == ["a", "b"] and settings.lora_enabled()


@pytest.mark.parametrize("key", ["changeme", "sk-xxx", "aaaaaaaaaaaa", "short"])
def test_placeholder_keys_are_refused(key: str) -> None:
    with pytest.raises(ValidationError, match="placeholder"):
        parse_settings(["--api-key", key])


def test_placeholder_in_keys_file_is_refused(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"ok:{GOOD_KEY}\nbad:changeme\n")
    with pytest.raises(ValidationError, match="'bad'"):
        ServeSettings(api_keys_file=keys)
    assert parse_keys_file(f"# c\n\n{GOOD_KEY}\nname: {GOOD_KEY} # trailing\n") == [
        (None, GOOD_KEY),
        ("name", GOOD_KEY),
    ]


@pytest.mark.parametrize("spec", ["noequals", "=path", "name="])
def test_bad_lora_spec(spec: str) -> None:
    with pytest.raises(ValidationError, match="name=path"):
        parse_settings(["--lora-modules", spec])


@pytest.mark.parametrize(
    ("specs", "message"),
    [(["a=/x", "a=/y"], "given twice"), (["a b=/x"], "invalid adapter name")],
)
def test_lora_names_are_checked_like_the_registry_does(specs: list[str], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        parse_settings(["--lora-modules", *specs])


def test_every_field_has_a_documented_flag() -> None:
    help_text = build_parser().format_help()
    for name, field in ServeSettings.model_fields.items():
        assert "--" + name.replace("_", "-") in help_text
        assert field.description, f"{name} has no description"


def test_cli_exits_2_with_every_problem_on_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "serve.cli", "--api-key", "changeme", "--port", "99999"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("serve: error: "), "every problem on one line"
    assert "placeholder" in result.stderr and "port" in result.stderr


@pytest.mark.parametrize("value", ["a=/tmp/adapter", ""])
def test_cli_refuses_a_list_setting_that_is_not_json(value: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "serve.cli"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "LLMSTACK_LORA_MODULES": value},
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("serve: error: ") and "lora_modules" in result.stderr
    assert "JSON" in result.stderr


def test_cli_refuses_a_missing_model_folder(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "serve.cli", "--model", str(tmp_path / "nope")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("serve: error: model path") and result.stderr.count("\n") == 1
