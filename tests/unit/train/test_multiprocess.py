"""Data parallelism through accelerate: two CPU processes (gloo) train the same adapter as one process with
the two processes' batches together, under DDP (`torchrun`) and under FSDP (`accelerate launch` with the
shipped `train/recipes/fsdp.yaml`, parameters and optimizer states sharded over the two processes)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.unit.train.conftest import chat_records, write_jsonl

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
BIN = Path(sys.executable).parent
TORCHRUN = shutil.which("torchrun", path=str(BIN))
ACCELERATE = shutil.which("accelerate", path=str(BIN))
FSDP_CONFIG = Path(__file__).parents[3] / "train" / "recipes" / "fsdp.yaml"
CPU_FSDP_CLI = Path(__file__).with_name("cpu_fsdp_cli.py")
# the launcher script (see its docstring) stands in for `-m train.cli`
FSDP_LAUNCH = [str(ACCELERATE), "launch", "--config_file", str(FSDP_CONFIG), "--num_processes", "2"]
FSDP_LAUNCH += ["--main_process_port", "0", str(CPU_FSDP_CLI)]


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=400, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _log(output: Path) -> dict:
    return json.loads((output / "train_log.json").read_text())


def _losses(output: Path) -> list[float]:
    return [r["loss"] for r in _log(output)["history"]]


class Runs:
    """Recipes and data shared by this module's tests, and the one-process reference run (batch 4)."""

    def __init__(self, root: Path, model: Path) -> None:
        self.root = root
        self.data = write_jsonl(root / "chat.jsonl", chat_records())
        self.per_process = root / "per_process.yaml"  # 2 processes x batch 2
        self.per_process.write_text(yaml.safe_dump({**RECIPE, "loop": {**RECIPE["loop"], "batch_size": 2}}))
        self.together = root / "together.yaml"  # 1 process x batch 4
        self.together.write_text(yaml.safe_dump({**RECIPE, "loop": {**RECIPE["loop"], "batch_size": 4}}))
        self.model = model
        self.single = root / "single"
        self.single_result = json.loads(_run(self.cli(self.single, self.together), root).stdout)

    def cli(self, output: Path, recipe: Path, *extra: str) -> list[str]:
        flags = ["--model", str(self.model), "--data", str(self.data), "--output", str(output)]
        return [sys.executable, "-m", "train.cli", "lora", *flags, "--config", str(recipe), *extra]


@pytest.fixture(scope="module")
def runs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs(tmp_path_factory.mktemp("multiprocess"), tiny_model_dir)


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed next to this interpreter")
def test_two_process_ddp_matches_one_process_big_batch(runs: Runs) -> None:
    ddp_out = runs.root / "ddp"
    train_cmd = runs.cli(ddp_out, runs.per_process)[1:]  # without the interpreter
    ddp = json.loads(_run([str(TORCHRUN), "--nproc_per_node", "2", *train_cmd], runs.root).stdout)
    ddp_log, single_log = _log(ddp_out), _log(runs.single)
    assert ddp_log["processes"] == 2 and single_log["processes"] == 1
    assert ddp_log["distributed"] == "MULTI_CPU"
    assert _losses(ddp_out) == pytest.approx(_losses(runs.single), rel=1e-5)
    assert ddp["eval_loss"] == pytest.approx(runs.single_result["eval_loss"], rel=1e-5)


@pytest.mark.skipif(ACCELERATE is None, reason="accelerate is not installed next to this interpreter")
def test_two_process_fsdp_matches_one_process_and_resumes(runs: Runs) -> None:
    """`accelerate launch --config_file train/recipes/fsdp.yaml` with 2 CPU processes (FSDP2, see
    cpu_fsdp_cli.py for why a CPU run needs that launcher script): same per-step losses and adapter as one
    process with batch 4, an adapter PEFT loads, and checkpoints that resume exactly, under FSDP and in a
    single process."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from core.models import load_causal_lm

    def fsdp_cmd(output: Path, *extra: str) -> list[str]:
        return [*FSDP_LAUNCH, *runs.cli(output, runs.per_process, *extra)[3:]]  # after `python -m train.cli`

    fsdp_out = runs.root / "fsdp"
    fsdp = json.loads(_run(fsdp_cmd(fsdp_out), runs.root).stdout)
    fsdp_log = _log(fsdp_out)
    assert fsdp_log["processes"] == 2 and fsdp_log["distributed"] == "FSDP"
    # fp32 throughout; only the order of the cross-process sums differs (reduce-scatter vs one process)
    assert _losses(fsdp_out) == pytest.approx(_losses(runs.single), rel=1e-5)
    assert fsdp["eval_loss"] == pytest.approx(runs.single_result["eval_loss"], rel=1e-5)
    got = load_file(fsdp_out / "adapter_model.safetensors")
    want = load_file(runs.single / "adapter_model.safetensors")
    assert got.keys() == want.keys() and len(got) > 0
    for name, tensor in want.items():  # the gathered adapter is whole, not one process's shard
        assert got[name].shape == tensor.shape
        assert got[name].allclose(tensor, rtol=1e-4, atol=1e-6), name
    adapted = PeftModel.from_pretrained(load_causal_lm(runs.model), str(fsdp_out))
    assert sum("lora_" in name for name, _ in adapted.named_parameters()) == len(got)

    # as if killed after the step-3 checkpoint: drop the newer one, resume under FSDP ...
    work = runs.root / "resumed.work"
    shutil.copytree(runs.root / "fsdp.work", work)
    shutil.rmtree(work / "checkpoints" / "step-00000006")
    resumed_out = runs.root / "resumed"
    resumed = _run(fsdp_cmd(resumed_out, "--resume", "--work-dir", str(work)), runs.root)
    assert "step-00000003" in resumed.stderr
    assert _log(resumed_out)["history"] == fsdp_log["history"]
    assert _log(resumed_out)["evals"] == fsdp_log["evals"]
    # ... and in one process with batch 4: the FSDP checkpoint holds whole tensors, not shards
    single_work = runs.root / "single_resumed.work"
    shutil.copytree(work, single_work)
    shutil.rmtree(single_work / "checkpoints" / "step-00000006")
    single_resumed = runs.root / "single_resumed"
    _run(runs.cli(single_resumed, runs.together, "--resume", "--work-dir", str(single_work)), runs.root)
    assert _losses(single_resumed) == pytest.approx(_losses(runs.single), rel=1e-5)


@pytest.mark.skipif(ACCELERATE is None, reason="accelerate is not installed next to this interpreter")
def test_two_process_fsdp_distillation_writes_the_whole_student(runs: Runs) -> None:
    """Full fine-tuning under FSDP: the student written at the end is gathered whole and equals the one
    process run's (same losses; weights to fp32 reduction-order noise). The FSDP run checkpoints its
    activations (`--gradient-checkpointing`, recomputed inside FSDP2's per-layer unshard), the one-process run
    keeps them: checkpointing changes neither the losses nor the weights."""
    from safetensors.torch import load_file

    recipe = {
        "max_length": 32,
        "max_samples": 32,
        "max_eval_samples": 8,
        "loop": {"max_steps": 4, "progress": False, "eval_every": 2, "checkpoint_every": 2},
    }
    outputs = {}
    one_process = [sys.executable, "-m", "train.cli"]
    runs_ = (("kd_fsdp", 4, FSDP_LAUNCH, "--gradient-checkpointing"), ("kd_single", 8, one_process, None))
    for name, batch, launcher, checkpointing in runs_:
        path = runs.root / f"{name}.yaml"
        path.write_text(yaml.safe_dump({**recipe, "loop": {**recipe["loop"], "batch_size": batch}}))
        outputs[name] = runs.root / name
        flags = ["--teacher", str(runs.model), "--output", str(outputs[name]), "--config", str(path)]
        flags += [checkpointing] if checkpointing else []
        _run([*launcher, "distill", *flags, "--student-layers", "1"], runs.root)
    fsdp, single = outputs["kd_fsdp"], outputs["kd_single"]
    assert _log(fsdp)["distributed"] == "FSDP"
    assert (
        _log(fsdp)["memory"]["checkpointed_layers"] == 1
        and _log(single)["memory"]["checkpointed_layers"] == 0
    )
    assert _losses(fsdp) == pytest.approx(_losses(single), rel=1e-5)
    got, want = load_file(fsdp / "model.safetensors"), load_file(single / "model.safetensors")
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert got[name].shape == tensor.shape
        assert got[name].allclose(tensor, rtol=1e-4, atol=1e-5), name
