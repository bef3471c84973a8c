"""Strict configuration models of the training backend and the recipe loader.

Invariant: every config model forbids unknown keys, and a recipe file's problems are reported together in one
`ConfigError` line (torchtune/llm-compressor style), before any model is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, Field

from core.config import StrictModel, validate_config
from core.errors import ConfigError
from train.monitor import ReportTo

Precision = Literal["auto", "fp32", "bf16", "fp16"]


class OptimConfig(StrictModel):
    """AdamW with linear warmup then cosine decay to a floor."""

    lr: float = Field(default=2e-4, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(default=0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(default=0, ge=0, description="Linear warmup from 0 to lr over this many steps.")
    min_lr_ratio: float = Field(
        default=0.1, ge=0, le=1, description="Cosine decay ends at lr * min_lr_ratio (the floor)."
    )
    grad_clip: float | None = Field(default=1.0, gt=0, description="Max gradient L2 norm; null disables.")


class LoopConfig(StrictModel):
    """The shared training loop (used by LoRA fine-tuning, distillation and QAT)."""

    epochs: int = Field(default=1, ge=1, description="Passes over the data (ignored when max_steps is set).")
    max_steps: int | None = Field(default=None, ge=1, description="Optimizer steps; overrides epochs.")
    batch_size: int = Field(default=4, ge=1, description="Sequences per micro-batch per process.")
    grad_accum: int = Field(default=1, ge=1, description="Micro-batches accumulated per optimizer step.")
    precision: Precision = Field(
        default="auto",
        description=(
            "Autocast dtype: auto = bf16 on a GPU that supports it, else fp32; fp16 adds a GradScaler."
        ),
    )
    seed: int = 0
    gradient_checkpointing: bool = Field(
        default=False,
        description=(
            "Recompute each decoder layer's activations in the backward instead of keeping them "
            "(non-reentrant torch checkpoint; the trained model only, never a frozen teacher): less memory, "
            "about one more forward of compute."
        ),
    )
    optim: OptimConfig = Field(default_factory=OptimConfig)
    eval_every: int = Field(default=50, ge=0, description="Evaluate every N steps (0: only at the end).")
    early_stop_patience: int | None = Field(
        default=None, ge=1, description="Stop after N evaluations without improvement; null disables."
    )
    early_stop_min_delta: float = Field(default=0.0, ge=0)
    checkpoint_every: int = Field(default=50, ge=0, description="Atomic checkpoint every N steps (0: none).")
    keep_checkpoints: int = Field(default=2, ge=1)
    max_bad_steps: int = Field(
        default=3, ge=1, description="Consecutive non-finite steps (skipped) before rolling back."
    )
    rollback_lr_factor: float = Field(default=0.5, gt=0, lt=1, description="LR multiplier at each rollback.")
    max_rollbacks: int = Field(default=3, ge=0)
    spike_window: int = Field(default=20, ge=3, description="Steps in the loss-spike z-score window.")
    spike_zscore: float = Field(default=4.0, gt=0)
    peak_tflops: float | None = Field(
        default=None, gt=0, description="Peak device TFLOP/s for MFU; null: a known GPU's, else no MFU."
    )
    progress: bool = True
    report_to: list[ReportTo] = Field(
        default_factory=lambda: list[ReportTo](["tensorboard"]),
        description=(
            "Monitoring sinks under the work folder: tensorboard (event files in <work>/tensorboard) and/or "
            "wandb (an offline run in <work>/wandb); [] for none."
        ),
    )
    wandb_project: str = Field(default="llmstack", min_length=1, description="W&B project of offline runs.")


class DataConfig(StrictModel):
    """Chat records (`{"messages": [...]}` per JSONL line) for supervised fine-tuning."""

    max_length: int = Field(default=512, ge=8, description="Longest rendered conversation, in tokens.")
    on_bad_record: Literal["skip", "refuse"] = Field(
        default="skip", description="skip: report each bad line and go on; refuse: stop before training."
    )
    heldout_every: int = Field(
        default=10, ge=2, description="Without eval data, every N-th record is held out for evaluation."
    )


class LoraSettings(StrictModel):
    """PEFT LoRA settings. vLLM serves rank <= its max_lora_rank (16 by default)."""

    rank: int = Field(default=8, ge=1)
    alpha: int = Field(default=16, gt=0, description="LoRA scaling numerator (scale = alpha / rank).")
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
    )


class LoraRecipe(StrictModel):
    """A LoRA fine-tuning recipe: `train lora --config recipe.yaml`."""

    lora: LoraSettings = Field(default_factory=LoraSettings)
    data: DataConfig = Field(default_factory=DataConfig)
    loop: LoopConfig = Field(default_factory=LoopConfig)


M = TypeVar("M", bound=BaseModel)


def recipe_mapping(path: Path | str) -> dict[str, Any]:
    """A YAML recipe's settings, not yet validated (flags may override them first); a missing file, bad
    YAML or a non-mapping is one `ConfigError`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"recipe {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {path} must be a mapping of settings")
    return raw


def load_recipe(path: Path | str | None, model: type[M]) -> M:
    """Parse a YAML recipe into `model` (no path: `model`'s defaults); every problem is reported together
    in one `ConfigError`."""
    if path is None:
        return model()
    raw = recipe_mapping(path)
    return validate_config(model, raw, context=f"recipe {path}")
