"""The `quantize` command line: complete help, and bad input → one line on stderr, exit 2, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from core.artifact import verify_artifact
from quantize.cli import app
from tests.unit.quantize.conftest import EVAL

SUBCOMMANDS = ["awq", "gptq", "rtn", "nf4", "merge-lora", "distill", "eval"]
FAST_EVAL = ["--eval-samples", "4", "--eval-seq-len", "32"]


def _run(*args: str | Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help(command: str) -> None:
    code, out, _ = _run(command, "--help")
    assert code == 0
    assert "Usage" in out and ("--output" in out or command == "eval")


def _assert_refused(code: int, err: str, fragment: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and fragment in lines[0]


def test_missing_model(tmp_path: Path) -> None:
    code, _, err = _run("awq", "--model", tmp_path / "nope", "--output", tmp_path / "out")
    _assert_refused(code, err, "does not exist")
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture(tmp_path: Path) -> None:
    model = tmp_path / "gpt2"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    code, _, err = _run("gptq", "--model", model, "--output", tmp_path / "out")
    _assert_refused(code, err, "unsupported architecture ['GPT2LMHeadModel']")
    assert not (tmp_path / "out").exists()


def test_existing_output_without_overwrite(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = _run("rtn", "--model", tiny_model_dir, "--output", out)
    _assert_refused(code, err, "already exists (pass --overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_empty_calibration_file(tiny_model_dir: Path, tmp_path: Path) -> None:
    empty = tmp_path / "calib.txt"
    empty.write_text("\n\n  \n")
    code, _, err = _run("awq", "--model", tiny_model_dir, "--output", tmp_path / "out", "--calib-data", empty)
    _assert_refused(code, err, "holds no text")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bits", ["3", "16"])
def test_unsupported_bits(tiny_model_dir: Path, tmp_path: Path, bits: str) -> None:
    code, _, err = _run("awq", "--model", tiny_model_dir, "--output", tmp_path / "out", "--bits", bits)
    _assert_refused(code, err, f"{bits}-bit weights are not supported (choose 4 or 8)")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["awq", "--format", "gptq"], "format: Input should be 'compressed-tensors' or 'awq'"),
        (["awq", "--format", "awq", "--bits", "8"], "format 'awq' stores 4-bit weights only (got 8 bits)"),
        (["gptq", "--format", "awq"], "format: Input should be 'compressed-tensors' or 'gptq'"),
    ],
)
def test_bad_format_is_refused(tiny_model_dir: Path, tmp_path: Path, args: list[str], fragment: str) -> None:
    code, _, err = _run(*args, "--model", tiny_model_dir, "--output", tmp_path / "out")
    _assert_refused(code, err, fragment)
    assert not (tmp_path / "out").exists()


def test_group_size_must_divide_layer_widths(tiny_model_dir: Path, tmp_path: Path) -> None:
    code, _, err = _run("gptq", "--model", tiny_model_dir, "--output", tmp_path / "out", "--group-size", "96")
    _assert_refused(code, err, "group size 96 does not divide the model's hidden_size (128)")
    assert not (tmp_path / "out").exists()


def test_merge_lora_weight_count_must_match(tiny_model_dir: Path, tmp_path: Path) -> None:
    code, _, err = _run(
        "merge-lora", "--base", tiny_model_dir, "--adapter", tmp_path, "--weights", "0.5", "--weights", "1",
        "--output", tmp_path / "out",
    )  # fmt: skip
    _assert_refused(code, err, "2 weights given for 1 adapters")


def test_rtn_command_writes_artifact_and_prints_quality(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "rtn"
    code, stdout, err = _run(
        "rtn", "--model", tiny_model_dir, "--output", out, "--group-size", "64", *FAST_EVAL
    )
    assert code == 0, err
    manifest = verify_artifact(out)
    assert manifest.parameters["group_size"] == 64
    printed = json.loads(stdout[stdout.index("{") :])
    assert printed["perplexity"] == pytest.approx(manifest.quality.perplexity)
    code, _, err = _run("rtn", "--model", tiny_model_dir, "--output", out, "--overwrite", *FAST_EVAL)
    assert code == 0, err
    assert verify_artifact(out).parameters["group_size"] == 128


def test_eval_command_against_reference(tiny_model_dir: Path, tiny_model_dir_b: Path) -> None:
    code, stdout, err = _run("eval", "--model", tiny_model_dir, "--reference", tiny_model_dir, *FAST_EVAL)
    assert code == 0, err
    same = json.loads(stdout)
    assert same["mean_kl"] == pytest.approx(0, abs=1e-6) and same["top1_agreement"] == 1
    assert same["perplexity"] == pytest.approx(same["perplexity_source"])
    code, stdout, err = _run("eval", "--model", tiny_model_dir, "--reference", tiny_model_dir_b, *FAST_EVAL)
    other = json.loads(stdout)
    assert other["mean_kl"] > 0.01 and other["top1_agreement"] < 0.5
    assert other["perplexity"] == pytest.approx(same["perplexity"])


def test_eval_of_a_gptqmodel_checkpoint_prints_only_json(
    gptq_classic_artifact: Path, tiny_model_dir: Path
) -> None:
    """gptqmodel logs on stdout while it loads a classic checkpoint; the CLI sends that to stderr. Same
    evaluation settings as the fixture's, so the figures match those in the manifest."""
    eval_args = ["--eval-samples", str(EVAL.eval_samples), "--eval-seq-len", str(EVAL.eval_seq_len)]
    code, stdout, err = _run(
        "eval", "--model", gptq_classic_artifact, "--reference", tiny_model_dir, *eval_args
    )
    assert code == 0, err
    printed = json.loads(stdout)
    recorded = verify_artifact(gptq_classic_artifact).quality
    assert printed["mean_kl"] == pytest.approx(recorded.mean_kl, rel=1e-4)
