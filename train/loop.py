"""The one training loop shared by LoRA fine-tuning, distillation and quantization-aware training.

Invariants:
- A step's loss is the sum of per-token losses of all its micro-batches (on all processes) divided by the
  step's total target-token count, so gradient accumulation and data parallelism give the gradients of the
  one big batch.
- The data order is a function of (seed, epoch) and the position (epoch, micro-batch) is checkpointed with
  the parameters, optimizer, scheduler and RNG states, so a resumed run repeats the uninterrupted run's
  loss curve step for step (on CPU, where kernels are deterministic).
- A non-finite loss or gradient never reaches the optimizer; repeated ones roll back to the last checkpoint
  with a lower learning rate.
- With `gradient_checkpointing` the trained model's decoder layers recompute their activations in the
  backward (`train.activations`); the losses and gradients are those of the run without it (float noise).
- Every step's loss, learning rate, gradient norm, throughput, MFU (where the peak is known) and memory, and
  every alert, go to the run's monitor (`train.monitor`: TensorBoard / offline W&B under the work folder);
  `history` itself stays free of timings, so it is the same whenever the run is repeated or resumed.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from tqdm.auto import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from core.errors import StackError
from train.activations import enable_gradient_checkpointing
from train.checkpoint import (
    Checkpoint,
    gather_optimizer,
    gather_trainable,
    is_sharded,
    list_checkpoints,
    load_checkpoint,
    restore_optimizer,
    restore_trainable,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from train.config import LoopConfig
from train.guard import NonFiniteGuard, SpikeDetector
from train.memory import MemoryEstimate
from train.monitor import Monitor, is_alert
from train.precision import resolve_precision
from train.report import (
    EpochStats,
    PhaseTimer,
    close_epoch,
    current_memory_mb,
    peak_flops,
    peak_memory_mb,
    plot_losses,
    write_log,
)

log = logging.getLogger(__name__)

Batch = Mapping[str, torch.Tensor]
# (model, batch) -> (sum of per-token losses, number of target tokens). The loop does the normalisation.
LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, torch.Tensor]]
IGNORE_INDEX = -100


class TrainingError(StackError):
    """Training cannot go on (for example: still non-finite after the allowed rollbacks)."""


@dataclass
class TrainTask:
    """What to train. `model` holds every trainable parameter (requires_grad=True) and only those are
    optimised and checkpointed; `collate` turns examples into a batch with a `labels` tensor (-100 = no
    target) whose shifted count is the token count the loss is normalised by."""

    model: nn.Module
    loss_fn: LossFn
    train_data: Sequence[Any]
    eval_data: Sequence[Any]
    collate: Callable[[list[Any]], dict[str, torch.Tensor]]
    flops_per_token: float | None = None
    eval_loss_fn: LossFn | None = None  # what eval/early stopping measure; defaults to loss_fn
    # parameter name -> multiple of optim.lr for that parameter (default 1): its own AdamW group
    lr_multiplier: Callable[[str], float] | None = None
    # train.memory's prediction for this task (both variants); the run reports the one it trained with
    memory_estimate: MemoryEstimate | None = None


@dataclass
class TrainResult:
    steps: int
    initial_eval_loss: float | None
    final_eval_loss: float
    best_eval_loss: float
    final_train_loss: float | None
    stopped_early: bool
    history: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    events: list[dict[str, Any]]
    alerts: list[dict[str, Any]]  # the events that need attention: spikes, skipped steps, rollbacks
    epochs: list[EpochStats]
    log_path: Path | None
    # gradient_checkpointing, checkpointed_layers, peak_memory_mb (this process) and, where the task has
    # one, estimated_memory_mb (train.memory's total for the chosen setting)
    memory: dict[str, Any] = field(default_factory=dict)


@dataclass
class _State:
    """Everything of the loop that a checkpoint must restore besides tensors."""

    step: int = 0
    epoch: int = 0
    micro: int = 0  # index of the next micro-batch in this epoch's order
    best_eval: float = math.inf
    evals_without_improvement: int = 0
    lr_scale: float = 1.0
    rollbacks: int = 0
    spike_window: list[float] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)


def target_tokens(batch: Batch) -> torch.Tensor:
    """Tokens that have a next-token target (what the loss is averaged over)."""
    return (batch["labels"][:, 1:] != IGNORE_INDEX).sum()


def causal_lm_loss_sum(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over target tokens, computed in fp32."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return token_ce_sum(logits, batch["labels"])


def token_ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shifted = labels[:, 1:]
    loss = nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.size(-1)),
        shifted.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, (shifted != IGNORE_INDEX).sum()


def make_accelerator() -> Accelerator:
    """The process's Accelerator: single device, or DDP/FSDP when started by `accelerate launch`/torchrun.
    Mixed precision is the loop's own (see train.precision), so accelerate's is left off."""
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    fsdp_requested = os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")
    if fsdp_requested and not is_sharded(accelerator) and accelerator.num_processes > 1:
        log.warning(
            "FSDP was requested but accelerate set up %s (accelerate shards only on accelerators, not on "
            "CPU processes): this run is plain data parallelism",
            accelerator.distributed_type,
        )
    if is_sharded(accelerator) and not accelerator.is_fsdp2:
        raise TrainingError("FSDP1 is not supported: set fsdp_version: 2 in the accelerate config")
    return accelerator


class _Run:
    """One training run; `run()` is setup -> steps -> report."""

    def __init__(
        self, task: TrainTask, config: LoopConfig, work_dir: Path, accelerator: Accelerator | None
    ) -> None:
        self.task = task
        self.config = config
        self.work_dir = work_dir
        self.ckpt_dir = work_dir / "checkpoints"
        self.acc = accelerator or make_accelerator()
        set_seed(config.seed)
        self.precision = resolve_precision(config.precision, self.acc.device)
        self.scaler = self.precision.make_scaler()
        # before prepare: FSDP2 shards the layers in place, and checkpointing wraps their __call__
        self.checkpointed_layers = (
            enable_gradient_checkpointing(task.model) if config.gradient_checkpointing else 0
        )
        optim = config.optim
        optimizer = torch.optim.AdamW(
            _param_groups(task, optim.lr), lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay
        )
        self.model, self.optimizer = self.acc.prepare(task.model, optimizer)
        # FSDP replaces the parameters by sharded ones: clip the prepared model's, not the originals
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        world = self.acc.num_processes
        self.micro_per_epoch = len(task.train_data) // (config.batch_size * world)
        if self.micro_per_epoch < config.grad_accum:
            raise TrainingError(
                f"{len(task.train_data)} training examples make fewer than grad_accum={config.grad_accum} "
                f"micro-batches of {config.batch_size} x {world} process(es)"
            )
        self.steps_per_epoch = self.micro_per_epoch // config.grad_accum
        self.total_steps = config.max_steps or config.epochs * self.steps_per_epoch
        # transformers' warmup+cosine schedule with a floor (min_lr_rate), a LambdaLR over base_lrs.
        self.scheduler = get_cosine_with_min_lr_schedule_with_warmup(
            self.optimizer,
            num_warmup_steps=optim.warmup_steps,
            num_training_steps=self.total_steps,
            min_lr_rate=optim.min_lr_ratio,
        )
        self.initial_lrs = list(self.scheduler.base_lrs)
        self.guard = NonFiniteGuard(max_bad=config.max_bad_steps)
        self.spikes = SpikeDetector(window=config.spike_window, zscore=config.spike_zscore)
        self.state = _State()
        self.timer = PhaseTimer(self.acc.device)
        self.peak = peak_flops(self.acc.device, config.peak_tflops)
        self.flops = (
            task.flops_per_token / self.peak if task.flops_per_token is not None and self.peak else None
        )
        self.monitor = Monitor()  # opened by run(), once the starting step is known
        self._step_tokens = 0  # input tokens of the last step, all processes

    def _event(self, event: dict[str, Any]) -> None:
        """Record a run event; alerts also go to the log and the monitor."""
        self.state.events.append(event)
        if is_alert(event) and self.acc.is_main_process:
            self.monitor.alert(event)

    # ---- data -------------------------------------------------------------------------------------------
    def _order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.config.seed * 100_003 + epoch)
        return torch.randperm(len(self.task.train_data), generator=generator).tolist()

    def _next_micro_batches(self) -> list[dict[str, torch.Tensor]]:
        """The step's micro-batches for this process; advances the data position."""
        state, cfg = self.state, self.config
        if state.micro + cfg.grad_accum > self.steps_per_epoch * cfg.grad_accum:
            state.epoch += 1
            state.micro = 0
        order = self._order(state.epoch)
        width = cfg.batch_size * self.acc.num_processes
        rank = self.acc.process_index
        batches = []
        for index in range(state.micro, state.micro + cfg.grad_accum):
            chunk = order[index * width : (index + 1) * width]
            mine = chunk[rank * cfg.batch_size : (rank + 1) * cfg.batch_size]
            batch = self.task.collate([self.task.train_data[i] for i in mine])
            batches.append({k: v.to(self.acc.device) for k, v in batch.items()})
        state.micro += cfg.grad_accum
        return batches

    # ---- checkpoints ------------------------------------------------------------------------------------
    def _save(self) -> None:
        sharded = is_sharded(self.acc)
        if sharded or self.acc.is_main_process:  # under FSDP gathering is a collective of all processes
            trainable = gather_trainable(self.acc, self.model)
            optimizer = gather_optimizer(self.acc, self.model, self.optimizer)
        if self.acc.is_main_process:
            state = dict(vars(self.state))
            state["spike_window"] = self.spikes.state()
            save_checkpoint(
                self.ckpt_dir,
                self.state.step,
                Checkpoint(
                    trainable=trainable,
                    optimizer=optimizer,
                    scheduler=self.scheduler.state_dict(),
                    scaler=self.scaler.state_dict() if self.scaler else None,
                    rng=rng_state(),
                    state=state,
                ),
                keep=self.config.keep_checkpoints,
            )
        self.acc.wait_for_everyone()

    def _restore(self, path: Path) -> None:
        ckpt = load_checkpoint(path)
        restore_trainable(self.acc, self.model, ckpt.trainable)
        restore_optimizer(self.acc, self.model, self.optimizer, ckpt.optimizer)
        self.scheduler.load_state_dict(ckpt.scheduler)
        if self.scaler and ckpt.scaler:
            self.scaler.load_state_dict(ckpt.scaler)
        set_rng_state(ckpt.rng)
        self.state = _State(**ckpt.state)
        self.spikes.load(self.state.spike_window)

    def _rollback(self) -> None:
        """Reload the newest checkpoint, keeping the event log, and lower the learning rate."""
        checkpoints = list_checkpoints(self.ckpt_dir)
        if self.state.rollbacks >= self.config.max_rollbacks or not checkpoints:
            raise TrainingError(
                f"loss still non-finite at step {self.state.step} after {self.state.rollbacks} rollback(s)"
            )
        keep = self.state
        self._restore(checkpoints[-1])
        self.state.rollbacks = keep.rollbacks + 1
        self.state.lr_scale = keep.lr_scale * self.config.rollback_lr_factor
        self.state.events = list(keep.events)
        self.monitor.restart(self.state.step, [e for e in keep.events if is_alert(e)])
        self._event(
            {
                "step": keep.step,
                "event": "rollback",
                "to_step": self.state.step,
                "lr_scale": self.state.lr_scale,
            }
        )
        self.scheduler.base_lrs = [lr * self.state.lr_scale for lr in self.initial_lrs]
        for group, base, fn in zip(
            self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas, strict=True
        ):
            group["lr"] = base * fn(self.scheduler.last_epoch)

    # ---- evaluation -------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> float:
        """Token-weighted mean loss over the eval data (all processes)."""
        self.model.eval()
        total = torch.zeros((), device=self.acc.device, dtype=torch.float64)
        count = torch.zeros((), device=self.acc.device, dtype=torch.float64)
        rank, world, size = self.acc.process_index, self.acc.num_processes, self.config.batch_size
        data = self.task.eval_data
        for start in range(rank * size, len(data), size * world):
            batch = self.task.collate(list(data[start : start + size]))
            batch = {k: v.to(self.acc.device) for k, v in batch.items()}
            with self.precision.autocast():
                loss, tokens = (self.task.eval_loss_fn or self.task.loss_fn)(self.model, batch)
            total += loss.double()
            count += tokens
        self.model.train()
        total, count = self.acc.reduce(total), self.acc.reduce(count)
        return float(total / count) if count > 0 else math.nan

    def _record_eval(self) -> bool:
        """Evaluate now; return True when early stopping says stop."""
        loss = self.evaluate()
        state, cfg = self.state, self.config
        state.evals.append({"step": state.step, "eval_loss": loss})
        if loss < state.best_eval - cfg.early_stop_min_delta:
            state.best_eval = loss
            state.evals_without_improvement = 0
        else:
            state.evals_without_improvement += 1
        log.info("step %d eval loss %.4f", state.step, loss)
        self.monitor.scalars(state.step, {"eval/loss": loss})
        patience = cfg.early_stop_patience
        if patience is not None and state.evals_without_improvement >= patience:
            self._event({"step": state.step, "event": "early_stop", "best_eval_loss": state.best_eval})
            return True
        return False

    # ---- one step ---------------------------------------------------------------------------------------
    def _step(self) -> dict[str, Any] | None:
        """One optimizer step; None when the step was skipped (non-finite)."""
        with self.timer.phase("data"):
            batches = self._next_micro_batches()
            input_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
            counts = torch.stack(
                [torch.stack([target_tokens(b) for b in batches]).sum().cpu(), torch.tensor(input_tokens)]
            ).to(self.acc.device)
            counts = self.acc.reduce(counts)  # [target tokens, input tokens] of all processes
            global_tokens = counts[0].clamp(min=1)
            self._step_tokens = int(counts[1])
        # DDP averages gradients over processes; multiplying by world size makes the result a token mean.
        scale = self.acc.num_processes / global_tokens
        loss_sum = torch.zeros((), device=self.acc.device)
        finite = True
        for index, batch in enumerate(batches):
            last = index == len(batches) - 1
            sync = nullcontext() if last else self.acc.no_sync(self.model)
            with sync:
                with self.timer.phase("forward"), self.precision.autocast():
                    loss, _ = self.task.loss_fn(self.model, batch)
                # every process must take the same branch, or DDP's next collective would hang
                bad = torch.tensor(0.0 if torch.isfinite(loss) else 1.0, device=self.acc.device)
                if float(self.acc.reduce(bad, reduction="sum")) > 0:
                    finite = False
                    break
                with self.timer.phase("backward"):
                    scaled = loss * scale
                    self.acc.backward(self.scaler.scale(scaled) if self.scaler else scaled)
                loss_sum += loss.detach()
        with self.timer.phase("optimizer"):
            grad_norm = math.nan
            if finite:
                if self.scaler:
                    self.scaler.unscale_(self.optimizer)
                clip = self.config.optim.grad_clip or math.inf
                grad_norm = float(self.acc.clip_grad_norm_(self.params, clip))
            verdict = self.guard.check(float(loss_sum) if finite else math.nan, grad_norm)
            if verdict != "ok" and not (self.scaler and finite):
                self.optimizer.zero_grad(set_to_none=True)
                self._event({"step": self.state.step, "event": "nonfinite_skip"})
                if verdict == "rollback":
                    self._rollback()
                return None
            if self.scaler:  # fp16: the scaler skips the update itself when gradients overflowed
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            lr = self.optimizer.param_groups[0]["lr"]
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        mean_loss = float(self.acc.reduce(loss_sum) / global_tokens)
        spike = self.spikes.update(mean_loss)
        if spike is not None:
            self._event({"step": self.state.step, "event": "loss_spike", "loss": mean_loss, "zscore": spike})
        record = {
            "step": self.state.step,
            "epoch": self.state.epoch,
            "loss": mean_loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": input_tokens,
        }
        self.state.history.append(record)
        return record

    # ---- the run ----------------------------------------------------------------------------------------
    def run(self, *, resume: bool, keep_files: bool) -> TrainResult:
        state_ckpts = list_checkpoints(self.ckpt_dir)
        resuming = resume and bool(state_ckpts)
        if resuming:
            self._restore(state_ckpts[-1])
            log.info("resumed from %s", state_ckpts[-1])
        elif state_ckpts:
            raise TrainingError(f"{self.ckpt_dir} holds checkpoints: pass --resume or use a new output")
        cfg = self.config
        self.monitor = Monitor.open(
            cfg.report_to,
            self.work_dir if keep_files else None,
            explicit="report_to" in cfg.model_fields_set,
            main_process=self.acc.is_main_process,
            resume_step=self.state.step if resuming else None,
            wandb_project=cfg.wandb_project,
            run_config=cfg.model_dump(mode="json"),
        )
        try:
            return self._run(resuming)
        finally:
            self.monitor.close()

    def _run(self, resuming: bool) -> TrainResult:
        cfg = self.config
        if not resuming:
            self._record_eval()
            self._save()  # step 0: the rollback target before the first periodic checkpoint
        self.model.train()
        bar = tqdm(
            total=self.total_steps,
            initial=self.state.step,
            disable=not (cfg.progress and self.acc.is_main_process),
            desc="train",
        )
        epochs: list[EpochStats] = []
        epoch_steps = epoch_tokens = 0
        epoch = self.state.epoch
        stopped_early = False
        while self.state.step < self.total_steps:
            started = time.perf_counter()
            record = self._step()
            if record is None:
                continue
            self._monitor_step(record, time.perf_counter() - started)
            if record["epoch"] != epoch:  # the first step of a new epoch: close the previous one
                epochs.append(self._close(epoch, epoch_steps, epoch_tokens))
                epoch, epoch_steps, epoch_tokens = record["epoch"], 0, 0
            epoch_steps += 1
            epoch_tokens += record["tokens"]
            busy = sum(self.timer.totals.values())
            tok_s = epoch_tokens / busy if busy else 0.0
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{tok_s:.0f}")
            step = self.state.step
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == self.total_steps:
                stopped_early = self._record_eval()
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                self._save()
            if stopped_early:
                break
        bar.close()
        epochs.append(self._close(epoch, epoch_steps, epoch_tokens))
        if self.state.evals[-1]["step"] != self.state.step:
            self._record_eval()
        return self._finish(epochs, stopped_early)

    def _monitor_step(self, record: dict[str, Any], seconds: float) -> None:
        tokens_per_s = self._step_tokens / seconds if seconds > 0 else 0.0
        per_device = tokens_per_s / self.acc.num_processes
        self.monitor.scalars(
            record["step"],
            {
                "train/loss": record["loss"],
                "train/lr": record["lr"],
                "train/grad_norm": record["grad_norm"],
                "train/epoch": record["epoch"],
                "perf/step_s": seconds,
                "perf/tokens_per_s": tokens_per_s,
                "perf/mfu": per_device * self.flops if self.flops is not None else None,
                "perf/memory_mb": current_memory_mb(self.acc.device),
                "perf/peak_memory_mb": peak_memory_mb(self.acc.device),
            },
        )

    def _close(self, epoch: int, steps: int, tokens: int) -> EpochStats:
        stats = close_epoch(epoch, steps, tokens, self.timer.take(), self.acc.device, self.flops)
        log.info("epoch %d: %s", epoch, stats)
        return stats

    def _memory_summary(self) -> dict[str, Any]:
        """Whether activations were checkpointed, this process's peak memory and, where the task has one,
        the estimator's prediction for the setting trained with."""
        summary: dict[str, Any] = {
            "gradient_checkpointing": self.config.gradient_checkpointing,
            "checkpointed_layers": self.checkpointed_layers,
            "peak_memory_mb": round(peak_memory_mb(self.acc.device), 1),
        }
        estimate = self.task.memory_estimate
        if estimate is not None:
            predicted = estimate.predicted(gradient_checkpointing=self.config.gradient_checkpointing)
            summary["estimated_memory_mb"] = round(predicted / 2**20, 1)
        return summary

    def _finish(self, epochs: list[EpochStats], stopped_early: bool) -> TrainResult:
        state = self.state
        evals = state.evals
        result = TrainResult(
            steps=state.step,
            initial_eval_loss=evals[0]["eval_loss"] if evals and evals[0]["step"] == 0 else None,
            final_eval_loss=evals[-1]["eval_loss"],
            best_eval_loss=min(e["eval_loss"] for e in evals),
            final_train_loss=state.history[-1]["loss"] if state.history else None,
            stopped_early=stopped_early,
            history=state.history,
            evals=evals,
            events=state.events,
            alerts=[e for e in state.events if is_alert(e)],
            epochs=epochs,
            log_path=None,
            memory=self._memory_summary(),
        )
        if self.acc.is_main_process:
            payload = {
                "config": self.config.model_dump(mode="json"),
                "precision": self.precision.name,
                "processes": self.acc.num_processes,
                "distributed": self.acc.distributed_type.value,  # NO, MULTI_CPU, MULTI_GPU (DDP), FSDP, ...
                "total_steps": self.total_steps,
                **{k: v for k, v in vars(result).items() if k != "log_path"},
            }
            result.log_path = write_log(self.work_dir, payload)
            plot_losses(self.work_dir, state.history, evals, result.alerts)
            if result.alerts:
                log.warning(
                    "%d alert(s) in this run: see `alerts` in %s", len(result.alerts), result.log_path
                )
        return result


def train(
    task: TrainTask,
    config: LoopConfig,
    work_dir: Path | None = None,
    *,
    resume: bool = False,
    accelerator: Accelerator | None = None,
) -> TrainResult:
    """Train `task.model` in place. Checkpoints, the JSON log, the loss-curve PNG and the monitor's files
    (`config.report_to`) go to `work_dir`; when it is None, checkpoints and logs go to a temporary folder
    removed at the end, and no monitor files are written."""
    if work_dir is not None:
        work_dir.mkdir(parents=True, exist_ok=True)
        return _Run(task, config, work_dir, accelerator).run(resume=resume, keep_files=True)
    with tempfile.TemporaryDirectory(prefix="train-") as tmp:
        result = _Run(task, config, Path(tmp), accelerator).run(resume=False, keep_files=False)
        result.log_path = None
        return result


def _param_groups(task: TrainTask, lr: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: the trainable parameters grouped by learning-rate multiple, the plain ones
    (multiple 1) first, so `param_groups[0]["lr"]` is the logged learning rate whenever there are any."""
    groups: dict[float, list[nn.Parameter]] = {}
    for name, param in task.model.named_parameters():
        if param.requires_grad:
            factor = task.lr_multiplier(name) if task.lr_multiplier is not None else 1.0
            groups.setdefault(factor, []).append(param)
    if not groups:
        raise TrainingError("the model has no trainable parameters")
    order = sorted(groups, key=lambda factor: factor != 1.0)
    return [{"params": groups[factor], "lr": lr * factor} for factor in order]
