"""Gradient checkpointing (`loop.gradient_checkpointing`): every recipe trains the same losses with it as
without it, only the trained model is checkpointed (never a distillation or QAT teacher), the run's summary
says so, and the peak memory of a run falls by about what the estimator predicts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from core.errors import ConfigError
from tests.unit.train.conftest import chat_records, write_jsonl
from train.activations import CheckpointingError, checkpointed_layers, enable_gradient_checkpointing
from train.config import LoopConfig, LoraRecipe

LOOP = {
    "max_steps": 3,
    "batch_size": 4,
    "eval_every": 0,
    "checkpoint_every": 0,
    "progress": False,
    "report_to": [],
    "optim": {"lr": 3e-3, "warmup_steps": 1},
}


def _losses(log: Path) -> list[float]:
    return [record["loss"] for record in json.loads(log.read_text())["history"]]


def test_lora_losses_match_and_the_summary_reports_it(tiny_model_dir: Path, tmp_path: Path) -> None:
    """LoRA with dropout on (the recomputed forward must replay the same masks): same per-step losses and
    eval loss; the summary names the setting, the 2 checkpointed layers and the lower prediction."""
    from train.lora import train_lora

    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(24))
    results = {}
    for checkpointing in (False, True):
        recipe = LoraRecipe.model_validate(
            {
                "lora": {"rank": 4, "dropout": 0.1},
                "data": {"max_length": 128},
                "loop": {**LOOP, "gradient_checkpointing": checkpointing},
            }
        )
        out = tmp_path / f"gc-{checkpointing}"
        results[checkpointing] = train_lora(tiny_model_dir, data, out, recipe)
    off, on = results[False], results[True]
    assert _losses(on.output / "train_log.json") == pytest.approx(
        _losses(off.output / "train_log.json"), rel=1e-5
    )
    assert on.eval_loss == pytest.approx(off.eval_loss, rel=1e-5)
    assert off.memory["gradient_checkpointing"] is False and off.memory["checkpointed_layers"] == 0
    assert on.memory["gradient_checkpointing"] is True and on.memory["checkpointed_layers"] == 2
    assert on.memory["estimated_memory_mb"] < off.memory["estimated_memory_mb"]
    assert json.loads((on.output / "train_log.json").read_text())["memory"] == on.memory


def test_distill_checkpoints_the_student_only(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Distillation (KL to the frozen 2-layer teacher) of a 1-layer student: same losses; one checkpointed
    layer, the student's (the teacher runs without gradients and is not checkpointed)."""
    from train.distill import DistillConfig, distill

    logs = {}
    for checkpointing in (False, True):
        config = DistillConfig.model_validate(
            {
                "teacher": tiny_model_dir,
                "student_layers": 1,
                "max_length": 32,
                "max_samples": 16,
                "max_eval_samples": 4,
                "loop": {**LOOP, "gradient_checkpointing": checkpointing},
            }
        )
        out = tmp_path / f"gc-{checkpointing}"
        result = distill(config, out)
        assert result.memory["checkpointed_layers"] == (1 if checkpointing else 0)
        logs[checkpointing] = out / "train_log.json"
    assert _losses(logs[True]) == pytest.approx(_losses(logs[False]), rel=1e-5)


def test_qat_losses_match_through_fake_quantized_weights(tiny_model_dir: Path) -> None:
    """QAT's recomputed layers fake-quantize their weights again (parametrized, learned scales): same
    losses as keeping the activations; the full-precision teacher is not checkpointed."""
    import copy

    from core.models import load_causal_lm, load_tokenizer
    from core.textdata import builtin_texts
    from train.data import tokenize_texts
    from train.loop import train
    from train.qat import QatSettings, _build_task, prepare_fake_quant

    tokenizer = load_tokenizer(tiny_model_dir)
    examples = tokenize_texts(tokenizer, builtin_texts("train")[:20], 32)
    settings = QatSettings(group_size=32)
    losses = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        teacher = load_causal_lm(tiny_model_dir, dtype=torch.float32).requires_grad_(False)
        student = copy.deepcopy(teacher).train()
        prepare_fake_quant(student, settings)
        task = _build_task(student, teacher, settings, 1e-4, examples[:16], examples[16:], 0)
        result = train(task, LoopConfig.model_validate({**LOOP, "gradient_checkpointing": checkpointing}))
        losses[checkpointing] = [record["loss"] for record in result.history]
        assert checkpointed_layers(teacher) == 0
        assert result.memory["checkpointed_layers"] == (2 if checkpointing else 0)
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_a_module_without_a_hugging_face_model_is_refused() -> None:
    with pytest.raises(CheckpointingError, match="not supported by Linear"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))


def test_flags_override_the_recipe(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`--gradient-checkpointing` / `--no-...` override loop.gradient_checkpointing in every recipe; the
    estimator's `predicted` total follows the flag."""
    from train.cli import _with_checkpointing, app
    from train.distill import distill_config
    from train.qat import QatRecipe

    recipe = LoraRecipe.model_validate({"loop": {"gradient_checkpointing": True}})
    assert _with_checkpointing(recipe, None).loop.gradient_checkpointing is True
    assert _with_checkpointing(recipe, False).loop.gradient_checkpointing is False
    assert _with_checkpointing(QatRecipe(), True).loop.gradient_checkpointing is True
    flags = {"teacher": tiny_model_dir, "loop": {"gradient_checkpointing": True}}
    assert distill_config(None, flags).loop.gradient_checkpointing is True
    assert (
        distill_config(None, {**flags, "loop": {"gradient_checkpointing": None}}).loop.gradient_checkpointing
        is False
    )
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        distill_config(None, {**flags, "loop": {"gradient_checkpointing": "sometimes"}})

    runner = CliRunner()
    args = ["estimate-memory", "--model", str(tiny_model_dir), "--seq-len", "256", "--json"]
    plain = json.loads(runner.invoke(app, args).stdout)
    checkpointed = json.loads(runner.invoke(app, [*args, "--gradient-checkpointing"]).stdout)
    assert plain["predicted"] == plain["total"]
    assert checkpointed["predicted"] == checkpointed["total_checkpointed"] < plain["total"]


# A fresh process trains each recipe's task through the real loop twice, without and with checkpointing, and
# prints each run's peak resident set above its start (the peak is reset before each run through
# /proc/self/clear_refs). glibc's mmap threshold is pinned (MALLOC_MMAP_THRESHOLD_) so freed tensors go back
# to the OS at once and the resident set follows live tensors (see test_memory.py). One process for all
# runs: importing transformers, peft and the loop costs more than the runs.
PROBE = """
import json, sys
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from train.config import LoopConfig
from train.data import Example, collate
from train.loop import TrainTask, causal_lm_loss_sum, train

config, seq_len = json.loads(sys.argv[1]), int(sys.argv[2])

def rss(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field + ":"))

def task(recipe):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config))
    ids = torch.randint(0, config["vocab_size"], (10, seq_len), generator=torch.Generator().manual_seed(0))
    data = [Example(row.tolist(), row.tolist()) for row in ids]
    if recipe == "lora":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", lora_dropout=0.0))
        return TrainTask(model, causal_lm_loss_sum, data[:8], data[8:], lambda e: collate(e, 0))
    from train.distill import DistillConfig, _build_task, student_from_teacher
    teacher = model.requires_grad_(False)
    student = student_from_teacher(teacher, config["num_hidden_layers"] // 2)
    settings = DistillConfig(teacher="unused", alpha=0.5)
    return _build_task(settings, teacher, student, data[:8], data[8:], 0, hard_labels_only=False)

peaks = {}
for recipe in ("lora", "distill"):
    for checkpointing in (False, True):
        loop = {"max_steps": 2, "batch_size": 4, "eval_every": 0, "checkpoint_every": 0, "progress": False,
                "report_to": [], "gradient_checkpointing": checkpointing}
        current = task(recipe)
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # VmHWM := VmRSS
        start = rss("VmRSS")
        train(current, LoopConfig.model_validate(loop))
        peaks[f"{recipe}_{'on' if checkpointing else 'off'}"] = rss("VmHWM") - start
        del current
print(json.dumps(peaks))
"""

# 4 layers of width 256 at 256 tokens x batch 4 (a distillation student: the first 2 of them): the kept
# activations are most of each run's peak.
SIZED = {
    "vocab_size": 512,
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "tie_word_embeddings": False,
}


def test_peak_memory_falls_by_the_checkpointed_activations() -> None:
    """Measured peak resident set of a LoRA and a distillation run (real loop, 2 steps), without and with
    checkpointing: with it the peak is at least 30% lower, and the drop lies between what the estimator says
    checkpointing saves (it charges one layer's recomputation to the checkpointed run, a lower bound) and
    all the activations it counts (an upper bound)."""
    from train.memory import estimate_memory

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    seq_len, batch = 256, 4
    run = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(SIZED), str(seq_len)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    peaks = json.loads(run.stdout.strip().splitlines()[-1])
    student = {**SIZED, "num_hidden_layers": SIZED["num_hidden_layers"] // 2}
    for recipe, trained, method in (("lora", SIZED, "lora"), ("distill", student, "full")):
        off, on = peaks[f"{recipe}_off"], peaks[f"{recipe}_on"]
        estimate = estimate_memory(trained, method=method, seq_len=seq_len, batch=batch)  # type: ignore[arg-type]
        saved = estimate.activations - estimate.activations_checkpointed
        assert on < 0.7 * off, (recipe, peaks)
        assert 0.5 * saved < off - on < 1.3 * estimate.activations, (recipe, peaks, estimate)
