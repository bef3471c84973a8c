"""The `quantize` command line: complete help, every method's config as its options, distill flags over a
recipe, and bad input → one line on stderr, exit 2, nothing written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from typer.testing import CliRunner

from core.artifact import verify_artifact
from core.errors import ConfigError
from core.quality import EvalConfig
from quantize.cli import app
from quantize.config import CalibrationConfig
from quantize.methods import METHODS
from tests.support.distill_flags import COMPARE_HARD_LABELS_CASES
from tests.unit.quantize.conftest import EVAL

SUBCOMMANDS = ["awq", "gptq", "rtn", "nf4", "merge-lora", "distill", "eval"]
FAST_EVAL = ["--eval-samples", "4", "--eval-seq-len", "32"]
COMMON = {"--model", "--output", "--overwrite", "--eval-data", "--eval-samples", "--eval-seq-len"}
CALIBRATION = {"--calib-data", "--num-samples", "--max-seq-len"}
WEIGHTS = {"--format", "--bits", "--group-size"}
METHOD_OPTIONS = {  # what each command offers; the first three kinds are the flags the commands always had
    "awq": WEIGHTS | CALIBRATION | {"--duo-scaling", "--n-grid"},
    "gptq": WEIGHTS | CALIBRATION | {"--dampening-frac", "--block-size"},
    "rtn": WEIGHTS | {"--symmetric"},
    "nf4": {"--format", "--double-quant", "--compute-dtype"},
}


def _run(*args: str | Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help(command: str) -> None:
    code, out, _ = _run(command, "--help")
    assert code == 0
    assert "Usage" in out and ("--output" in out or command == "eval")


def _options(command: str) -> dict[str, typer.core.TyperOption]:
    group = typer.main.get_command(app)
    assert isinstance(group, typer.core.TyperGroup)
    return {
        name: param
        for param in group.commands[command].params
        if isinstance(param, typer.core.TyperOption)
        for name in param.opts
        if name != "--help"
    }


@pytest.mark.parametrize("kind", METHODS)
def test_method_command_offers_its_config_fields(kind: str) -> None:
    """Each option of a method command is a field of its config (or of the nested calibration, or of the
    evaluation settings), with that field's description as help and its default as default."""
    options = _options(kind)
    assert set(options) == METHOD_OPTIONS[kind] | COMMON
    fields = {
        **METHODS[kind].config.model_fields,
        **CalibrationConfig.model_fields,
        **EvalConfig.model_fields,
    }
    for flag, option in options.items():
        field = fields.get(flag.removeprefix("--").replace("-", "_"))
        if field is None:
            assert flag in {"--model", "--output", "--overwrite"}
            continue
        assert option.help == field.description and field.description
        assert option.default == field.get_default(call_default_factory=True)
    assert _options(kind)["--format"].default == METHODS[kind].config().format


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
        (["awq", "--format", "awq", "--n-grid", "10"], "always uses duo scaling and a 20-point grid"),
        (["awq", "--format", "awq", "--no-duo-scaling"], "always uses duo scaling and a 20-point grid"),
        (
            ["awq", "--num-samples", "0"],
            "calibration.num_samples: Input should be greater than or equal to 1",
        ),
        (["gptq", "--format", "awq"], "format: Input should be 'compressed-tensors' or 'gptq'"),
        (["gptq", "--format", "gptq", "--block-size", "64"], "always quantizes blocks of 128 columns"),
        (["gptq", "--dampening-frac", "1.5"], "dampening_frac: Input should be less than 1"),
        (["rtn", "--format", "awq"], "format: Input should be 'compressed-tensors'"),
        (
            ["nf4", "--compute-dtype", "int8"],
            "compute_dtype: Input should be 'bfloat16', 'float16' or 'float32'",
        ),
        (["nf4", "--eval-samples", "0"], "eval_samples: Input should be greater than or equal to 1"),
    ],
)
def test_bad_settings_are_refused(
    tiny_model_dir: Path, tmp_path: Path, args: list[str], fragment: str
) -> None:
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
    code, _, err = _run(
        "rtn", "--model", tiny_model_dir, "--output", out, "--overwrite", "--symmetric", *FAST_EVAL
    )
    assert code == 0, err
    parameters = verify_artifact(out).parameters
    assert parameters["group_size"] == 128 and parameters["symmetric"] is True
    assert parameters["method"] == "rtn" and parameters["format"] == "compressed-tensors"


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
    gptq_classic_artifact: Path, outlier_model_dir: Path
) -> None:
    """gptqmodel logs on stdout while it loads a classic checkpoint; the CLI sends that to stderr. Same
    evaluation settings as the fixture's, so the figures match those in the manifest."""
    eval_args = ["--eval-samples", str(EVAL.eval_samples), "--eval-seq-len", str(EVAL.eval_seq_len)]
    code, stdout, err = _run(
        "eval", "--model", gptq_classic_artifact, "--reference", outlier_model_dir, *eval_args
    )
    assert code == 0, err
    printed = json.loads(stdout)
    recorded = verify_artifact(gptq_classic_artifact).quality
    assert printed["mean_kl"] == pytest.approx(recorded.mean_kl, rel=1e-4)


@pytest.fixture
def distill_runs(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The `DistillConfig` each `quantize distill` run hands to the API (which is replaced: it records the
    config and stops the command there, as a user error would)."""
    from quantize import api

    seen: list[Any] = []

    def stop(config: Any, *args: object, **kwargs: object) -> None:
        seen.append(config)
        raise ConfigError("stopped by the test")

    monkeypatch.setattr(api, "distill", stop)
    return seen


@pytest.mark.parametrize(("recipe", "flags", "expected"), COMPARE_HARD_LABELS_CASES)
def test_distill_compare_hard_labels_flag_over_recipe(
    distill_runs: list[Any], tmp_path: Path, recipe: dict[str, bool] | None, flags: list[str], expected: bool
) -> None:
    args = ["distill", "--teacher", tmp_path, "--output", tmp_path / "student", *flags]
    if recipe is not None:
        (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        args += ["--config", tmp_path / "recipe.yaml"]
    code, _, err = _run(*args)
    _assert_refused(code, err, "stopped by the test")
    assert [config.compare_hard_labels for config in distill_runs] == [expected]


def test_distill_flags_override_the_recipe_key_by_key(distill_runs: list[Any], tmp_path: Path) -> None:
    recipe = {"alpha": 0.2, "temperature": 3.0, "loop": {"max_steps": 5, "batch_size": 2}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    code, _, err = _run(
        "distill", "--teacher", tmp_path, "--output", tmp_path / "student",
        "--config", tmp_path / "recipe.yaml", "--alpha", "0.7", "--max-steps", "9",
    )  # fmt: skip
    _assert_refused(code, err, "stopped by the test")
    (config,) = distill_runs
    assert (config.alpha, config.temperature) == (0.7, 3.0)
    assert (config.loop.max_steps, config.loop.batch_size) == (9, 2)
