"""Knowledge distillation of a causal LM into a smaller student (the loop behind `quantize distill`).

Invariants:
- The loss per target token is `alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student)`, plus
  `hidden_weight * MSE` between student hidden states (through learned projections when the hidden sizes
  differ) and the teacher's at evenly spaced layers; it is trained by the shared loop (`train.loop`).
- The reported held-out loss is the student's plain next-token cross-entropy on held-out text, so it is
  comparable with the teacher's and with the hard-label baseline (same initial student, data, order, steps).
- `output_dir` receives a plain Hugging Face model folder (config, safetensors, tokenizer) plus the run's
  JSON log and loss-curve PNG; the caller adds the manifest.
"""

from __future__ import annotations

import copy
import logging
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import set_seed
from pydantic import Field, model_validator
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from core.config import StrictModel, validate_config
from core.errors import ConfigError
from core.models import load_causal_lm, load_tokenizer, read_config
from core.textdata import BUILTIN_CORPUS, load_texts
from train.checkpoint import is_sharded
from train.config import LoopConfig, recipe_mapping
from train.data import IGNORE_INDEX, Example, collate, pad_token_id, tokenize_texts
from train.loop import Batch, TrainTask, make_accelerator, token_ce_sum, train
from train.report import LOG_NAME, PLOT_NAME

log = logging.getLogger(__name__)


class DistillConfig(StrictModel):
    """What to distil, into what, on which text."""

    teacher: Path = Field(description="Teacher model folder.")
    student: Path | None = Field(
        default=None, description="Student model folder (same tokenizer); null: built from the teacher."
    )
    student_layers: int | None = Field(
        default=None,
        ge=1,
        description="Without `student`: keep the teacher's first N layers (default: half of them).",
    )
    data: str = Field(
        default=BUILTIN_CORPUS, description="Training text: .txt/.jsonl file or builtin:pydoc-topics."
    )
    eval_data: str | None = Field(
        default=None,
        description="Held-out text; null: the built-in held-out split, or every 10th sample of a file.",
    )
    max_samples: int | None = Field(default=None, ge=1, description="Use at most this many training texts.")
    max_eval_samples: int | None = Field(
        default=None, ge=1, description="Use at most this many held-out texts."
    )
    max_length: int = Field(default=256, ge=8, description="Tokens per training sample (truncated).")
    temperature: float = Field(default=2.0, gt=0)
    alpha: float = Field(default=0.5, ge=0, le=1, description="Weight of the KL term; 1 - alpha for CE.")
    hidden_weight: float = Field(default=0.0, ge=0, description="Weight of hidden-state matching (0: off).")
    compare_hard_labels: bool = Field(
        default=False,
        description="Also train the same student on hard labels only (same data, order and steps) and report "
        "its held-out loss; off unless asked for, as it doubles the training time.",
    )
    loop: LoopConfig = Field(default_factory=LoopConfig)
    work_dir: Path | None = Field(default=None, description="Checkpoints and logs; null: a temporary folder.")
    resume: bool = Field(default=False, description="Continue from the newest checkpoint in work_dir.")

    @model_validator(mode="after")
    def _student_source(self) -> DistillConfig:
        if self.student is not None and self.student_layers is not None:
            raise ValueError("give either student or student_layers, not both")
        if self.resume and self.work_dir is None:
            raise ValueError("resume needs work_dir")
        return self


def distill_config(
    recipe: Path | None, flags: Mapping[str, Any], *, defaults: Mapping[str, Any] | None = None
) -> DistillConfig:
    """The settings of one run, the same way for `train distill` and `quantize distill`: a flag that was
    given (not None) overrides the recipe's value, the recipe's overrides the command's own `defaults`, and
    what none of them sets takes `DistillConfig`'s documented default (`compare_hard_labels`: off). A nested
    mapping (`{"loop": {"max_steps": 8}}`) overrides the recipe's key by key. All problems are reported
    together in one `ConfigError`."""
    settings = _overlay(defaults or {}, recipe_mapping(recipe) if recipe is not None else {})
    return validate_config(DistillConfig, _overlay(settings, _given(flags)), context="distill settings")


def _given(flags: Mapping[str, Any]) -> dict[str, Any]:
    """The flags that were given: None values (and mappings left empty without them) dropped, at any depth."""
    given: dict[str, Any] = {}
    for key, value in flags.items():
        if isinstance(value, Mapping):
            value = _given(value) or None
        if value is not None:
            given[key] = value
    return given


def _overlay(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with every value of `top` put over it, mappings merged key by key."""
    merged = dict(base)
    for key, value in top.items():
        below = merged.get(key)
        if isinstance(value, Mapping) and isinstance(below, Mapping):
            value = _overlay(below, value)
        merged[key] = value
    return merged


class DistillResult(StrictModel):
    """Measured outcome (losses are mean next-token cross-entropy on held-out text, nats/token)."""

    heldout_loss: float
    heldout_loss_initial: float
    heldout_loss_teacher: float
    heldout_loss_hard_labels: float | None = None
    steps: int
    student_layers: int
    student_params: int
    teacher_params: int
    train_samples: int
    eval_samples: int
    stopped_early: bool
    alerts: list[dict[str, Any]] = Field(
        default_factory=list, description="Loss spikes, skipped non-finite steps, rollbacks of the run."
    )
    memory: dict[str, Any] = Field(
        default_factory=dict,
        description="Gradient checkpointing on/off and checkpointed layers, peak memory (MiB) of the run.",
    )


class _StudentWithProjections(nn.Module):
    """The trained module: the student plus the hidden-state projections (trained with it)."""

    def __init__(self, student: PreTrainedModel, projections: nn.ModuleList) -> None:
        super().__init__()
        self.student = student
        self.projections = projections

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, hidden: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        out = self.student(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=hidden)
        if not hidden:
            return out.logits, []
        states = out.hidden_states[1:]  # one per layer (index 0 is the embeddings)
        return out.logits, [proj(h) for proj, h in zip(self.projections, states, strict=True)]


def student_from_teacher(teacher: PreTrainedModel, layers: int) -> PreTrainedModel:
    """A student with the teacher's config but only its first `layers` layers, initialised from them."""
    total = teacher.config.num_hidden_layers
    if not 1 <= layers <= total:
        raise ConfigError(f"student_layers must be between 1 and the teacher's {total} layers, got {layers}")
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:layers]
    student = AutoModelForCausalLM.from_config(config, dtype=teacher.dtype)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not missing, f"student parameters not found in the teacher: {missing[:3]}"
    assert all(".layers." in k for k in unexpected), unexpected[:3]
    return student


def layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """Teacher layer (0-based) matched by each student layer: evenly spaced, last to last."""
    return [round((i + 1) * teacher_layers / student_layers) - 1 for i in range(student_layers)]


def kl_sum(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, t: float
) -> torch.Tensor:
    """Sum over masked positions of T^2 * KL(teacher_T || student_T), computed in fp32."""
    s = nn.functional.log_softmax(student_logits.float() / t, dim=-1)
    p = nn.functional.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (p.exp() * (p - s)).sum(-1)  # per position
    return (kl * mask).sum() * t * t


def target_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, t: float
) -> torch.Tensor:
    """`kl_sum` of the next-token distributions over the positions that predict a target token (the shifted
    `labels` are not IGNORE_INDEX): the distillation term of every loss that learns from a teacher."""
    mask = (labels[:, 1:] != IGNORE_INDEX).to(torch.float32)
    return kl_sum(student_logits[:, :-1], teacher_logits[:, :-1], mask, t)


def teacher_outputs(teacher: nn.Module, batch: Batch, device: torch.device, *, hidden: bool = False) -> Any:
    """The frozen teacher's outputs on `batch`, computed without gradients; the teacher is moved to `device`
    (the trained model's: the loop places only that one) the first time."""
    if next(teacher.parameters()).device != device:
        teacher.to(device)
    with torch.no_grad():
        return teacher(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=hidden
        )


def flops_per_token(student_params: int, teacher_params: int, *, with_teacher: bool) -> float:
    """Training FLOPs per token: the student's forward and backward (6 N), plus the teacher's forward (2 N)
    when the loss runs it."""
    return 6.0 * student_params + (2.0 * teacher_params if with_teacher else 0.0)


def _build_task(
    config: DistillConfig,
    teacher: PreTrainedModel,
    student: PreTrainedModel,
    train_data: list[Example],
    eval_data: list[Example],
    pad_id: int,
    *,
    hard_labels_only: bool,
) -> TrainTask:
    alpha = 0.0 if hard_labels_only else config.alpha
    hidden_weight = 0.0 if hard_labels_only else config.hidden_weight
    student_hidden, teacher_hidden = student.config.hidden_size, teacher.config.hidden_size
    n_student = student.config.num_hidden_layers
    mapping = layer_map(n_student, teacher.config.num_hidden_layers)
    projections = nn.ModuleList(
        nn.Identity() if student_hidden == teacher_hidden else nn.Linear(student_hidden, teacher_hidden)
        for _ in range(n_student if hidden_weight > 0 else 0)
    )
    module = _StudentWithProjections(student.train(), projections)

    def loss_fn(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        labels = batch["labels"]
        logits, hidden = model(batch["input_ids"], batch["attention_mask"], hidden_weight > 0)
        ce, tokens = token_ce_sum(logits, labels)
        if alpha == 0 and hidden_weight == 0:
            return ce, tokens
        t_out = teacher_outputs(teacher, batch, logits.device, hidden=hidden_weight > 0)
        loss = (1 - alpha) * ce + alpha * target_kl(logits, t_out.logits, labels, config.temperature)
        if hidden_weight > 0:
            token_mask = batch["attention_mask"].float()
            for student_h, index in zip(hidden, mapping, strict=True):
                target = t_out.hidden_states[index + 1].float()
                per_token = (student_h.float() - target).pow(2).mean(-1)
                loss = loss + hidden_weight * (per_token * token_mask).sum()
        return loss, tokens

    def eval_loss_fn(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        logits, _ = model(batch["input_ids"], batch["attention_mask"], False)
        return token_ce_sum(logits, batch["labels"])

    params = sum(p.numel() for p in student.parameters())
    return TrainTask(
        model=module,
        loss_fn=loss_fn,
        eval_loss_fn=eval_loss_fn,
        train_data=train_data,
        eval_data=eval_data,
        collate=lambda examples: collate(examples, pad_id),
        flops_per_token=flops_per_token(
            params, sum(p.numel() for p in teacher.parameters()), with_teacher=alpha != 0
        ),
    )


def _texts(config: DistillConfig) -> tuple[list[str], list[str]]:
    train_texts, name = load_texts(config.data, split="train")
    if config.eval_data is not None:
        eval_texts, _ = load_texts(config.eval_data, split="heldout")
    elif name == BUILTIN_CORPUS:
        eval_texts, _ = load_texts(None, split="heldout")
    else:
        eval_texts = train_texts[::10]
        train_texts = [t for i, t in enumerate(train_texts) if i % 10]
    return train_texts[: config.max_samples], eval_texts[: config.max_eval_samples]


def distill(config: DistillConfig, output_dir: Path) -> DistillResult:
    """Distil `config.teacher` into a student and write the student to `output_dir` (created; must not
    exist or be empty)."""
    set_seed(config.loop.seed)  # student init and projections are random: same seed, same run
    teacher_config = read_config(config.teacher)
    tokenizer = load_tokenizer(config.teacher)
    teacher = load_causal_lm(config.teacher, dtype=torch.float32)
    teacher.requires_grad_(False)
    save_dtype = teacher_config.get("torch_dtype") or teacher_config.get("dtype") or "float32"
    if config.student is not None:
        student = load_causal_lm(config.student, dtype=torch.float32)
        if student.config.vocab_size != teacher.config.vocab_size:
            raise ConfigError(
                f"student vocabulary ({student.config.vocab_size}) differs from the teacher's "
                f"({teacher.config.vocab_size}): distillation needs the same tokenizer"
            )
    else:
        layers = config.student_layers or max(1, teacher.config.num_hidden_layers // 2)
        student = student_from_teacher(teacher, layers)
    initial_student = copy.deepcopy(student) if config.compare_hard_labels else None

    train_texts, eval_texts = _texts(config)
    train_data = tokenize_texts(tokenizer, train_texts, config.max_length)
    eval_data = tokenize_texts(tokenizer, eval_texts, config.max_length)
    pad_id = pad_token_id(tokenizer)
    log.info("distilling on %d samples, %d held out", len(train_data), len(eval_data))

    with tempfile.TemporaryDirectory(prefix="distill-") as tmp:
        work_root = config.work_dir or Path(tmp)
        task = _build_task(config, teacher, student, train_data, eval_data, pad_id, hard_labels_only=False)
        accelerator = make_accelerator()
        work = work_root / "distill"
        result = train(task, config.loop, work, resume=config.resume, accelerator=accelerator)
        # under FSDP (version 2 shards the module in place) gather the student whole on the main process
        student_state = (
            _student_state(accelerator.get_state_dict(task.model)) if is_sharded(accelerator) else None
        )
        teacher_loss = _heldout_loss(teacher, eval_data, pad_id)
        hard_loss = None
        if initial_student is not None:
            hard_task = _build_task(
                config, teacher, initial_student, train_data, eval_data, pad_id, hard_labels_only=True
            )
            hard_result = train(hard_task, config.loop, work_root / "hard_labels", resume=config.resume)
            hard_loss = hard_result.final_eval_loss
        if PartialState().is_main_process:  # one writer under accelerate launch / torchrun
            output_dir.mkdir(parents=True, exist_ok=True)
            for name in (LOG_NAME, PLOT_NAME):
                shutil.copy2(work_root / "distill" / name, output_dir / name)
            dtype = getattr(torch, str(save_dtype).removeprefix("torch."))
            student.to(dtype)
            if student_state is not None:
                student_state = {name: tensor.to(dtype) for name, tensor in student_state.items()}
            student.save_pretrained(output_dir, state_dict=student_state)
            tokenizer.save_pretrained(output_dir)
    PartialState().wait_for_everyone()
    return DistillResult(
        heldout_loss=result.final_eval_loss,
        heldout_loss_initial=result.initial_eval_loss
        if result.initial_eval_loss is not None
        else float("nan"),
        heldout_loss_teacher=teacher_loss,
        heldout_loss_hard_labels=hard_loss,
        steps=result.steps,
        student_layers=student.config.num_hidden_layers,
        student_params=sum(p.numel() for p in student.parameters()),
        teacher_params=sum(p.numel() for p in teacher.parameters()),
        train_samples=len(train_data),
        eval_samples=len(eval_data),
        stopped_early=result.stopped_early,
        alerts=result.alerts,
        memory=result.memory,
    )


def _student_state(wrapper_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The student's entries of a `_StudentWithProjections` state dict, without the prefix."""
    prefix = "student."
    return {name[len(prefix) :]: t for name, t in wrapper_state.items() if name.startswith(prefix)}


@torch.no_grad()
def _heldout_loss(model: PreTrainedModel, examples: list[Example], pad_id: int) -> float:
    """Mean next-token cross-entropy of `model` on `examples`."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(examples), 8):
        batch = {k: v.to(device) for k, v in collate(examples[start : start + 8], pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss, tokens = token_ce_sum(logits, batch["labels"])
        total += float(loss)
        count += int(tokens)
    return total / max(count, 1)
