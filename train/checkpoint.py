"""Atomic training checkpoints.

Invariant: a checkpoint folder `step-XXXXXXXX` exists only complete: it is written in a temporary sibling
and renamed into place, so a run killed at any instant leaves either the previous or the new checkpoint,
never a half-written one. It holds the trainable parameters, optimizer, scheduler, RNG states and the loop
state (data position, guard and early-stopping state, log history).

Under FSDP the parameters and optimizer states are sharded over the processes: `gather_trainable` and
`gather_optimizer` collect full tensors on the main process (collectives: every process calls them), and a
checkpoint stores the same full tensors whatever the number of processes that wrote it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

_PREFIX = "step-"
_FULL_OPTIMIZER = "full_optimizer_state_by_name"


@dataclass
class Checkpoint:
    """What a checkpoint restores."""

    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any] | None
    rng: dict[str, Any]
    state: dict[str, Any]


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that training changes (frozen base weights are not checkpointed)."""
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in tensors]
    if missing:
        raise RuntimeError(f"checkpoint lacks trainable parameters, e.g. {missing[0]}")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value.to(params[name].device))


def is_sharded(accelerator: Accelerator) -> bool:
    """Whether `accelerator` shards parameters (FSDP): then no process holds them whole."""
    return accelerator.distributed_type == DistributedType.FSDP


def trainable_names(model: nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


def gather_trainable(accelerator: Accelerator, model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters of the prepared `model` as full CPU tensors. Under FSDP this is a collective
    that only gathers the trainable parameters (`ignore_frozen_params`), and only the main process gets
    them (the others get an empty dict)."""
    if not is_sharded(accelerator):
        return trainable_state(accelerator.unwrap_model(model))
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    state = get_model_state_dict(model, options=options)
    return {name: cast(torch.Tensor, state[name]) for name in trainable_names(model) if name in state}


def restore_trainable(accelerator: Accelerator, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load full trainable tensors (from `gather_trainable`) into the prepared `model`; under FSDP every
    process passes the full tensors and keeps its own shard."""
    if not is_sharded(accelerator):
        load_trainable(accelerator.unwrap_model(model), tensors)
        return
    missing = [name for name in trainable_names(model) if name not in tensors]
    if missing:
        raise RuntimeError(f"checkpoint lacks trainable parameters, e.g. {missing[0]}")
    full: dict[str, Any] = dict(tensors)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, strict=False))


def gather_optimizer(
    accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """The optimizer state to checkpoint: `optimizer.state_dict()`, or under FSDP (a collective) the full,
    unsharded state keyed by parameter name, on the main process. Before the first step (no state yet) it
    is `optimizer.state_dict()` in every case: torch's `get_optimizer_state_dict` would initialise an empty
    AdamW state by taking a zero-gradient step, which advances AdamW's step count."""
    if not is_sharded(accelerator) or not _inner(optimizer).state:
        return optimizer.state_dict()
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {_FULL_OPTIMIZER: get_optimizer_state_dict(model, _inner(optimizer), options=options)}


def restore_optimizer(
    accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    if _FULL_OPTIMIZER in state:  # written under FSDP: parameter-name keys, full tensors
        options = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(model, _inner(optimizer), state[_FULL_OPTIMIZER], options=options)
    elif is_sharded(accelerator) and state["state"]:
        raise RuntimeError("this checkpoint was written without FSDP: resume it without FSDP")
    else:
        optimizer.load_state_dict(state)


def _inner(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's AcceleratedOptimizer wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: Path, step: int, checkpoint: Checkpoint, *, keep: int) -> Path:
    """Write checkpoint `step` atomically under `root` and keep only the newest `keep`."""
    root.mkdir(parents=True, exist_ok=True)
    dest = root / f"{_PREFIX}{step:08d}"
    tmp = root / f".tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        torch.save(checkpoint.trainable, tmp / "trainable.pt")
        torch.save(
            {
                "optimizer": checkpoint.optimizer,
                "scheduler": checkpoint.scheduler,
                "scaler": checkpoint.scaler,
                "rng": checkpoint.rng,
            },
            tmp / "training_state.pt",
        )
        (tmp / "state.json").write_text(json.dumps(checkpoint.state))
        for file in tmp.iterdir():  # data reaches the disk before the rename makes it visible
            with file.open("rb") as handle:
                os.fsync(handle.fileno())
        if dest.exists():
            shutil.rmtree(dest)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return dest


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX))


def load_checkpoint(path: Path) -> Checkpoint:
    # Our own files: the RNG states hold Python tuples, so the full unpickler is needed.
    training = torch.load(path / "training_state.pt", weights_only=False)
    return Checkpoint(
        trainable=torch.load(path / "trainable.pt", weights_only=True),
        optimizer=training["optimizer"],
        scheduler=training["scheduler"],
        scaler=training["scaler"],
        rng=training["rng"],
        state=json.loads((path / "state.json").read_text()),
    )
