"""The `train` command line: a run killed with SIGKILL resumes to the same loss curve; errors are one line;
`train distill` flags override the recipe (both ways) through the one merge that `quantize distill` uses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tests.support.distill_flags import COMPARE_HARD_LABELS_CASES
from train.config import LoraRecipe
from train.distill import DistillConfig, DistillResult, distill_config
from train.lora import train_lora

RECIPE = {
    "lora": {"rank": 4, "alpha": 8, "dropout": 0.1},  # dropout: the resumed run must restore RNG state too
    "data": {"max_length": 128, "heldout_every": 5},
    "loop": {
        "max_steps": 24,
        "batch_size": 2,
        "grad_accum": 2,
        "eval_every": 8,
        "checkpoint_every": 4,
        "progress": False,
        "optim": {"lr": 2e-3, "warmup_steps": 3},
    },
}


def _train_cmd(model: Path, data: Path, out: Path, recipe: Path, *extra: str) -> list[str]:
    flags = ["--model", str(model), "--data", str(data), "--output", str(out), "--config", str(recipe)]
    return [sys.executable, "-m", "train.cli", "lora", *flags, *extra]


def test_sigkilled_run_resumes_to_the_same_loss_curve(
    tiny_model_dir: Path, chat_jsonl: Path, tmp_path: Path
) -> None:
    """Kill a real `train lora` process with SIGKILL once its step-8 checkpoint exists, resume it with
    `--resume`, and compare every step's loss with an uninterrupted run of the same recipe."""
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(RECIPE))
    out = tmp_path / "adapter"
    checkpoints = tmp_path / "adapter.work" / "checkpoints"
    proc = subprocess.Popen(
        _train_cmd(tiny_model_dir, chat_jsonl, out, recipe_path),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 240
    while not (checkpoints / "step-00000008").is_dir():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()  # the adapter is written only at the end, atomically
    killed_at = max(int(p.name.split("-")[1]) for p in checkpoints.iterdir() if p.name.startswith("step-"))
    assert killed_at < 24

    resumed = subprocess.run(
        _train_cmd(tiny_model_dir, chat_jsonl, out, recipe_path, "--resume"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr

    reference = train_lora(tiny_model_dir, chat_jsonl, tmp_path / "ref", LoraRecipe.model_validate(RECIPE))
    got = json.loads((out / "train_log.json").read_text())
    want = json.loads((tmp_path / "ref" / "train_log.json").read_text())
    assert [r["loss"] for r in got["history"]] == [r["loss"] for r in want["history"]]
    assert got["history"] == want["history"] and got["evals"] == want["evals"]
    assert json.loads(resumed.stdout)["eval_loss"] == reference.eval_loss


def test_errors_are_one_line_with_status_2(tiny_model_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("loop: {max_steps: 0, unknown: 1}\n")
    data = tmp_path / "d.jsonl"
    data.write_text('{"messages": []}\n')
    run = subprocess.run(
        _train_cmd(tiny_model_dir, data, tmp_path / "o", bad), cwd=tmp_path, capture_output=True, text=True
    )
    assert run.returncode == 2
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("error: recipe") and "loop.max_steps" in last and "loop.unknown" in last
    flags = ["--model", str(tiny_model_dir), "--data", str(data), "--output", str(tmp_path / "o")]
    refused = subprocess.run(
        [sys.executable, "-m", "train.cli", "lora", *flags],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 2
    assert "holds no usable chat record" in refused.stderr.strip().splitlines()[-1]
    assert "d.jsonl:1:" in refused.stderr  # the skipped line was reported with its number


def test_estimate_memory_command(tiny_model_dir: Path) -> None:
    flags = ["--model", str(tiny_model_dir), "--method", "full", "--seq-len", "128", "--batch", "2", "--json"]
    run = subprocess.run(
        [sys.executable, "-m", "train.cli", "estimate-memory", *flags],
        capture_output=True,
        text=True,
        check=True,
    )
    estimate = json.loads(run.stdout)
    assert estimate["params"] == 819_840
    assert estimate["gradients"] == 4 * 819_840 and estimate["optimizer_states"] == 8 * 819_840
    assert estimate["total_checkpointed"] < estimate["total"]


@pytest.fixture
def distill_runs(monkeypatch: pytest.MonkeyPatch) -> list[DistillConfig]:
    """The config each in-process `train distill` run hands to the loop (replaced: it records the config)."""
    import train.distill

    seen: list[DistillConfig] = []

    def record(config: DistillConfig, output_dir: Path) -> DistillResult:
        seen.append(config)
        return DistillResult(
            heldout_loss=1.0, heldout_loss_initial=2.0, heldout_loss_teacher=0.5, steps=0, student_layers=1,
            student_params=1, teacher_params=2, train_samples=1, eval_samples=1, stopped_early=False,
        )  # fmt: skip

    monkeypatch.setattr(train.distill, "distill", record)
    return seen


def _recipe(folder: Path, settings: dict[str, object] | None) -> list[str]:
    if settings is None:
        return []
    (folder / "recipe.yaml").write_text(yaml.safe_dump(settings))
    return ["--config", str(folder / "recipe.yaml")]


@pytest.mark.parametrize(("recipe", "flags", "expected"), COMPARE_HARD_LABELS_CASES)
def test_distill_compare_hard_labels_flag_over_recipe(
    distill_runs: list[DistillConfig],
    tmp_path: Path,
    recipe: dict[str, object] | None,
    flags: list[str],
    expected: bool,
) -> None:
    from train.cli import app

    args = ["distill", "--teacher", str(tmp_path), "--output", str(tmp_path / "student")]
    result = CliRunner().invoke(app, [*args, *flags, *_recipe(tmp_path, recipe)])
    assert result.exit_code == 0, result.output
    assert [config.compare_hard_labels for config in distill_runs] == [expected]


@pytest.mark.parametrize(
    ("recipe", "flag", "expected"),
    [
        (None, None, "student.work"),  # the command's own default
        ("from-recipe", None, "from-recipe"),
        ("from-recipe", "from-flag", "from-flag"),
    ],
)
def test_distill_work_dir_flag_over_recipe_over_default(
    distill_runs: list[DistillConfig], tmp_path: Path, recipe: str | None, flag: str | None, expected: str
) -> None:
    from train.cli import app

    args = ["distill", "--teacher", str(tmp_path), "--output", str(tmp_path / "student")]
    args += _recipe(tmp_path, {"work_dir": str(tmp_path / recipe)} if recipe else None)
    args += ["--work-dir", str(tmp_path / flag)] if flag else []
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert [config.work_dir for config in distill_runs] == [tmp_path / expected]


def test_distill_config_merges_nested_flags_key_by_key(tmp_path: Path) -> None:
    _recipe(tmp_path, {"alpha": 0.2, "loop": {"max_steps": 5, "batch_size": 2}})
    flags = {"teacher": tmp_path, "alpha": None, "temperature": 3.0, "loop": {"max_steps": 9, "seed": None}}
    config = distill_config(tmp_path / "recipe.yaml", flags)
    assert (config.alpha, config.temperature) == (0.2, 3.0)
    assert (config.loop.max_steps, config.loop.batch_size, config.loop.seed) == (9, 2, 0)
    assert distill_config(None, {"teacher": tmp_path, "loop": {"max_steps": None}}).loop.max_steps is None
