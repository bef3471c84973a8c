"""Mixed-precision policy.

Invariant: autocast runs in the resolved dtype on the device it was resolved for; a GradScaler exists only
for fp16 (bf16 and fp32 have the fp32 exponent range and need no loss scaling).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from train.config import Precision


@dataclass(frozen=True)
class PrecisionPolicy:
    """The dtype of autocast (None: full fp32) and whether a GradScaler is needed."""

    device_type: str
    dtype: torch.dtype | None

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    @property
    def needs_scaler(self) -> bool:
        return self.dtype is torch.float16

    def make_scaler(self) -> torch.amp.GradScaler | None:
        return torch.amp.GradScaler(self.device_type) if self.needs_scaler else None

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        if self.dtype is None:
            yield
            return
        with torch.autocast(device_type=self.device_type, dtype=self.dtype):
            yield


def resolve_precision(requested: Precision, device: torch.device) -> PrecisionPolicy:
    """`auto` is bf16 on a GPU that supports it and fp32 elsewhere (CPU bf16 autocast works but is only
    faster on CPUs with bf16 units, so it is opt-in there)."""
    if requested == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return PrecisionPolicy(device.type, torch.bfloat16)
        return PrecisionPolicy(device.type, None)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[requested]
    return PrecisionPolicy(device.type, dtype)
