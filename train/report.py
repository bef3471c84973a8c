"""Run reporting: phase timers, per-epoch breakdown, MFU, memory, the JSON log and the loss-curve PNG.

Invariant: reporting only observes; nothing here changes what is trained.
"""

from __future__ import annotations

import json
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

LOG_NAME = "train_log.json"
PLOT_NAME = "loss_curve.png"

# Dense bf16 peak TFLOP/s of common accelerators (vendor datasheets), for MFU when not configured.
KNOWN_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 125.0,
    "RTX 4090": 165.0,
}


def peak_flops(device: torch.device, configured_tflops: float | None) -> float | None:
    """Peak FLOP/s of `device`: the configured value, a known GPU's, or None (no MFU is reported)."""
    if configured_tflops is not None:
        return configured_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in KNOWN_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return None


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory allocated by torch, or this process image's peak RSS on CPU.

    On Linux the CPU figure is VmHWM: getrusage's ru_maxrss survives fork+exec, so a trainer started by a
    large parent would report the parent's peak."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = _proc_status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_memory_mb(device: torch.device) -> float:
    """Accelerator memory allocated by torch now, or this process's resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    resident = _proc_status_mb("VmRSS")
    return resident if resident is not None else peak_memory_mb(device)


def _proc_status_mb(field: str) -> float | None:
    """The `field` line of /proc/self/status (kB) in MiB; None where there is no such file or line."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


@dataclass
class EpochStats:
    """Where the time of one epoch went."""

    epoch: int
    steps: int = 0
    tokens: int = 0
    data_s: float = 0.0
    forward_s: float = 0.0
    backward_s: float = 0.0
    optimizer_s: float = 0.0
    peak_memory_mb: float = 0.0
    tokens_per_s: float = 0.0
    mfu: float | None = None


@dataclass
class PhaseTimer:
    """Accumulates wall time per phase; synchronizes CUDA so GPU work is attributed to its phase."""

    device: torch.device
    totals: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start

    def take(self) -> dict[str, float]:
        totals, self.totals = self.totals, {}
        return totals


def close_epoch(
    epoch: int, steps: int, tokens: int, timings: dict[str, float], device: torch.device, flops: float | None
) -> EpochStats:
    """Summarise one epoch. MFU = achieved FLOP/s (6·N per token) / peak FLOP/s, when both are known."""
    busy = sum(timings.values())
    tokens_per_s = tokens / busy if busy > 0 else 0.0
    return EpochStats(
        epoch=epoch,
        steps=steps,
        tokens=tokens,
        data_s=round(timings.get("data", 0.0), 4),
        forward_s=round(timings.get("forward", 0.0), 4),
        backward_s=round(timings.get("backward", 0.0), 4),
        optimizer_s=round(timings.get("optimizer", 0.0), 4),
        peak_memory_mb=round(peak_memory_mb(device), 1),
        tokens_per_s=round(tokens_per_s, 1),
        mfu=None if flops is None else tokens_per_s * flops,
    )


def write_log(folder: Path, payload: dict[str, Any]) -> Path:
    path = folder / LOG_NAME
    path.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, EpochStats):
        return asdict(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def plot_losses(
    folder: Path,
    steps: list[dict[str, Any]],
    evals: list[dict[str, Any]],
    alerts: list[dict[str, Any]] | None = None,
) -> Path:
    """A PNG of the training loss per step and the eval loss per evaluation; alerts (spikes, skipped steps,
    rollbacks) are marked by vertical lines at their step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], label="train loss", linewidth=1)
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    colours = {"loss_spike": "tab:orange", "nonfinite_skip": "tab:red", "rollback": "tab:purple"}
    for kind, colour in colours.items():
        marks = sorted({a["step"] for a in alerts or [] if a["event"] == kind})
        for index, step in enumerate(marks):
            ax.axvline(step, color=colour, alpha=0.5, linestyle="--", label=kind if index == 0 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = folder / PLOT_NAME
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
