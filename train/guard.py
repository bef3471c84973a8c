"""Stability guard: non-finite losses and loss spikes.

Invariant: a non-finite step never reaches the optimizer; `max_bad` consecutive ones ask for a rollback.
A spike is a finite loss more than `zscore` standard deviations above the mean of the previous `window`
finite losses; spikes are reported, not hidden.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

Verdict = Literal["ok", "skip", "rollback"]


@dataclass
class SpikeDetector:
    """Z-score of each new loss against a sliding window of previous losses."""

    window: int = 20
    zscore: float = 4.0
    history: deque[float] = field(default_factory=deque)

    def update(self, loss: float) -> float | None:
        """Record `loss`; return its z-score when it is a spike, else None."""
        spike = None
        if len(self.history) >= max(3, self.window // 2):
            mean = statistics.fmean(self.history)
            std = statistics.pstdev(self.history)
            z = (loss - mean) / std if std > 0 else (math.inf if loss > mean else 0.0)
            if z > self.zscore:
                spike = z
        self.history.append(loss)
        while len(self.history) > self.window:
            self.history.popleft()
        return spike

    def state(self) -> list[float]:
        return list(self.history)

    def load(self, values: list[float]) -> None:
        self.history = deque(values)


@dataclass
class NonFiniteGuard:
    """Counts consecutive non-finite steps."""

    max_bad: int = 3
    consecutive: int = 0

    def check(self, *values: float) -> Verdict:
        if all(math.isfinite(v) for v in values):
            self.consecutive = 0
            return "ok"
        self.consecutive += 1
        if self.consecutive >= self.max_bad:
            self.consecutive = 0
            return "rollback"
        return "skip"
