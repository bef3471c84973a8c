"""The `train` command line: a run killed with SIGKILL resumes to the same loss curve; errors are one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from train.config import LoraRecipe
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
