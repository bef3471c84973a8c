"""Data parallelism through accelerate: `torchrun` with two CPU processes (gloo DDP) trains the same
adapter as one process with the two processes' batches together."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

RECIPE = {
    "lora": {"rank": 4, "alpha": 8, "dropout": 0.0},
    "data": {"max_length": 128, "heldout_every": 5},
    "loop": {
        "max_steps": 6,
        "eval_every": 3,
        "checkpoint_every": 3,
        "progress": False,
        "optim": {"lr": 3e-3, "warmup_steps": 2},
    },
}


def _run(cmd: list[str], cwd: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=400, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed next to this interpreter")
def test_two_process_ddp_matches_one_process_big_batch(
    tiny_model_dir: Path, chat_jsonl: Path, tmp_path: Path
) -> None:
    per_process = tmp_path / "ddp.yaml"
    per_process.write_text(yaml.safe_dump({**RECIPE, "loop": {**RECIPE["loop"], "batch_size": 2}}))
    together = tmp_path / "single.yaml"
    together.write_text(yaml.safe_dump({**RECIPE, "loop": {**RECIPE["loop"], "batch_size": 4}}))
    common = ["lora", "--model", str(tiny_model_dir), "--data", str(chat_jsonl)]
    ddp_args = [*common, "--output", str(tmp_path / "ddp"), "--config", str(per_process)]
    ddp = _run([str(TORCHRUN), "--nproc_per_node", "2", "-m", "train.cli", *ddp_args], tmp_path)
    single_args = [*common, "--output", str(tmp_path / "single"), "--config", str(together)]
    single = _run([sys.executable, "-m", "train.cli", *single_args], tmp_path)
    ddp_log = json.loads((tmp_path / "ddp" / "train_log.json").read_text())
    single_log = json.loads((tmp_path / "single" / "train_log.json").read_text())
    assert ddp_log["processes"] == 2 and single_log["processes"] == 1
    ddp_losses = [r["loss"] for r in ddp_log["history"]]
    single_losses = [r["loss"] for r in single_log["history"]]
    assert ddp_losses == pytest.approx(single_losses, rel=1e-5)
    assert ddp["eval_loss"] == pytest.approx(single["eval_loss"], rel=1e-5)
