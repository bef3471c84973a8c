"""Atomic training checkpoints.

Invariant: a checkpoint folder `step-XXXXXXXX` exists only complete: it is written in a temporary sibling
and renamed into place, so a run killed at any instant leaves either the previous or the new checkpoint,
never a half-written one. It holds the trainable parameters, optimizer, scheduler, RNG states and the loop
state (data position, guard and early-stopping state, log history).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

_PREFIX = "step-"


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
