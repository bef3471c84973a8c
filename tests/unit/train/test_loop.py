"""The shared training loop's practices, each checked on the tiny model so that it would fail without it."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from train.checkpoint import list_checkpoints
from train.config import LoopConfig, OptimConfig
from train.guard import SpikeDetector
from train.loop import TrainingError, causal_lm_loss_sum, train
from train.precision import resolve_precision


def loop_config(**overrides) -> LoopConfig:
    base = {"max_steps": 6, "batch_size": 2, "eval_every": 0, "checkpoint_every": 0, "progress": False}
    return LoopConfig.model_validate({**base, **overrides})


class StepRecorder:
    """Records, at each optimizer step, the gradients the optimizer is about to apply (global hook)."""

    def __init__(self) -> None:
        self.grads: list[dict[int, torch.Tensor]] = []
        self.norms: list[float] = []

    def __enter__(self) -> StepRecorder:
        def hook(optimizer, args, kwargs):
            grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            self.grads.append({i: g.detach().clone() for i, g in enumerate(grads)})
            self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

        self.handle = register_optimizer_step_pre_hook(hook)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def test_precision_policy_autocasts_and_scales_only_fp16(make_task) -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu).dtype is None  # CPU default: fp32
    assert resolve_precision("bf16", cpu).make_scaler() is None
    assert resolve_precision("fp32", cpu).make_scaler() is None
    assert isinstance(resolve_precision("fp16", cpu).make_scaler(), torch.amp.GradScaler)
    seen: list[torch.dtype] = []

    def loss_fn(model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        seen.append(logits.dtype)
        return causal_lm_loss_sum(model, batch)

    train(make_task(loss_fn), loop_config(max_steps=1, precision="bf16"))
    assert seen and set(seen) == {torch.bfloat16}  # the matmuls ran in bf16 under autocast
    seen.clear()
    train(make_task(loss_fn), loop_config(max_steps=1, precision="fp32"))
    assert set(seen) == {torch.float32}
    seen.clear()
    fp16 = train(make_task(loss_fn), loop_config(max_steps=2, precision="fp16"))  # the GradScaler path
    assert set(seen) == {torch.float16} and all(math.isfinite(r["loss"]) for r in fp16.history)


def test_warmup_then_cosine_decay_to_floor(make_task) -> None:
    optim = OptimConfig(lr=1e-3, warmup_steps=3, min_lr_ratio=0.1)
    result = train(make_task(), loop_config(max_steps=10, optim=optim))
    lrs = [r["lr"] for r in result.history]
    assert lrs[:3] == pytest.approx([0.0, 1e-3 / 3, 2e-3 / 3])  # linear warmup
    assert lrs[3] == pytest.approx(1e-3)
    assert all(a >= b for a, b in itertools.pairwise(lrs[3:]))  # monotone decay after warmup
    assert min(lrs[3:]) >= 1e-4 - 1e-12  # never below the floor
    assert lrs[-1] == pytest.approx(1e-4 + 0.9e-3 * (1 + math.cos(math.pi * 6 / 7)) / 2)


def test_gradient_accumulation_equals_big_batch(make_task) -> None:
    """Two micro-batches of 2 with different lengths accumulate to the gradient of one batch of 4."""
    with StepRecorder() as big:
        train(make_task(), loop_config(max_steps=1, batch_size=4, grad_accum=1))
    with StepRecorder() as accumulated:
        train(make_task(), loop_config(max_steps=1, batch_size=2, grad_accum=2))
    assert len(big.grads) == len(accumulated.grads) == 1
    for index, grad in big.grads[0].items():
        torch.testing.assert_close(accumulated.grads[0][index], grad, rtol=1e-4, atol=1e-6)


def test_gradient_norm_is_clipped_and_logged(make_task) -> None:
    with StepRecorder() as steps:
        result = train(make_task(), loop_config(max_steps=3, optim=OptimConfig(grad_clip=0.05)))
    logged = [r["grad_norm"] for r in result.history]
    assert all(n > 0.05 for n in logged)  # the log holds the norm before clipping
    assert all(n <= 0.05 * 1.0001 for n in steps.norms)  # the optimizer saw clipped gradients
    assert steps.norms[0] < logged[0]


def test_injected_nan_is_skipped_then_rolled_back_and_run_finishes(make_task, tmp_path: Path) -> None:
    calls = {"n": 0}

    def flaky(model, batch):
        calls["n"] += 1
        loss, tokens = causal_lm_loss_sum(model, batch)
        if 6 <= calls["n"] <= 8:  # three bad steps in a row: two skips, then a rollback
            return loss * float("nan"), tokens
        return loss, tokens

    config = loop_config(max_steps=8, checkpoint_every=2, max_bad_steps=3, optim=OptimConfig(lr=1e-3))
    result = train(make_task(flaky, eval_loss_fn=causal_lm_loss_sum), config, tmp_path)
    kinds = [e["event"] for e in result.events]
    assert kinds.count("nonfinite_skip") == 3 and kinds.count("rollback") == 1
    rollback = next(e for e in result.events if e["event"] == "rollback")
    assert rollback["lr_scale"] == 0.5 and rollback["to_step"] == 4
    assert result.steps == 8 and all(math.isfinite(r["loss"]) for r in result.history)
    assert math.isfinite(result.final_eval_loss)
    # after the rollback the learning rate is half of what the schedule alone gives
    plain = train(make_task(), loop_config(max_steps=8, optim=OptimConfig(lr=1e-3)))
    assert result.history[-1]["lr"] == pytest.approx(plain.history[-1]["lr"] * 0.5)


def test_always_nan_fails_cleanly_after_max_rollbacks(make_task, tmp_path: Path) -> None:
    def broken(model, batch):
        loss, tokens = causal_lm_loss_sum(model, batch)
        return loss * float("nan"), tokens

    with pytest.raises(TrainingError, match="non-finite"):
        train(make_task(broken), loop_config(max_rollbacks=2, max_bad_steps=2), tmp_path)


def test_resume_repeats_the_uninterrupted_loss_curve(make_task, tmp_path: Path) -> None:
    """A run that crashes after step 5 and resumes from its step-4 checkpoint matches an uninterrupted run
    step for step (losses, learning rates, gradient norms, eval losses)."""
    config = loop_config(max_steps=10, checkpoint_every=2, eval_every=4, optim=OptimConfig(warmup_steps=2))
    reference = train(make_task(), config, tmp_path / "a")

    calls = {"n": 0}

    def crashing(model, batch):
        calls["n"] += 1
        # calls 1-4: initial eval; 5-8: steps 1-4; 9-12: eval at step 4; 13: step 5; 14: step 6 -> crash
        if calls["n"] == 14:
            raise KeyboardInterrupt
        return causal_lm_loss_sum(model, batch)

    with pytest.raises(KeyboardInterrupt):
        train(make_task(crashing), config, tmp_path / "b")
    assert list_checkpoints(tmp_path / "b" / "checkpoints")[-1].name == "step-00000004"
    resumed = train(make_task(), config, tmp_path / "b", resume=True)
    assert resumed.history == reference.history
    assert resumed.evals == reference.evals


def test_early_stopping_on_eval_loss(make_task) -> None:
    evals = iter(range(100))

    def eval_loss(model, batch):  # eval loss rises from the first evaluation on
        return torch.tensor(float(next(evals))), torch.tensor(1)

    result = train(
        make_task(eval_loss_fn=eval_loss), loop_config(max_steps=50, eval_every=2, early_stop_patience=2)
    )
    assert result.stopped_early and result.steps == 4
    assert any(e["event"] == "early_stop" for e in result.events)


def test_reports_log_plot_breakdown_and_mfu(make_task, tmp_path: Path) -> None:
    n_params = 819_840.0
    result = train(
        make_task(flops_per_token=6 * n_params), loop_config(max_steps=4, peak_tflops=1.0), tmp_path
    )
    log = json.loads((tmp_path / "train_log.json").read_text())
    assert [r["step"] for r in log["history"]] == [1, 2, 3, 4]
    assert (tmp_path / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    epoch = result.epochs[0]
    assert epoch.forward_s > 0 and epoch.backward_s > 0 and epoch.optimizer_s > 0 and epoch.data_s > 0
    assert epoch.peak_memory_mb > 50  # process peak RSS on CPU
    assert epoch.mfu is not None
    # tokens_per_s is reported rounded to 0.1: the MFU (from the unrounded rate) agrees up to that rounding
    tflop_per_token = 6 * n_params / 1e12
    assert epoch.mfu == pytest.approx(epoch.tokens_per_s * tflop_per_token, abs=0.051 * tflop_per_token)
    assert {"loss", "lr", "grad_norm", "tokens"} <= set(log["history"][0])


def test_spike_detector_flags_outliers_only() -> None:
    detector = SpikeDetector(window=10, zscore=4.0)
    noisy = [2.0 + 0.05 * math.sin(i) for i in range(20)]
    assert [detector.update(x) for x in noisy] == [None] * 20
    assert detector.update(3.0) is not None  # far above the window's mean
    assert detector.update(2.0) is None


def test_loss_spike_is_reported_in_the_run(make_task) -> None:
    calls = {"n": 0}

    def spiky(model, batch):
        calls["n"] += 1
        loss, tokens = causal_lm_loss_sum(model, batch)
        return (loss * 10 if calls["n"] == 12 else loss), tokens

    result = train(
        make_task(spiky, eval_loss_fn=causal_lm_loss_sum), loop_config(max_steps=14, spike_window=8)
    )
    spikes = [e for e in result.events if e["event"] == "loss_spike"]
    assert [e["step"] for e in spikes] == [12]


def test_checkpoint_write_is_atomic(make_task, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure while writing a checkpoint leaves the previous ones intact and no partial folder."""
    config = loop_config(max_steps=4, checkpoint_every=2)
    real_save = torch.save
    saves = {"n": 0}

    def failing_save(obj, path, *args, **kwargs):
        saves["n"] += 1
        if saves["n"] == 5:  # steps 0 and 2 write 2 files each; step 4's first file is written, then fails
            real_save(obj, path, *args, **kwargs)
            raise OSError("disk full")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        train(make_task(), config, tmp_path)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-00000000", "step-00000002"]
