"""Admission control: at most `max_running` requests in the engine, at most `max_waiting` queued for a slot.

Invariant: a request is either rejected at once (429 + Retry-After, nothing started) or holds exactly one
slot until `Slot.release()` (idempotent) runs; the running/waiting gauges always equal the counts here.
"""

from __future__ import annotations

import asyncio
import time

from serve import metrics
from serve.errors import OpenAIError


class Slot:
    """A held admission slot; `queue_time` is how long the request waited for it."""

    def __init__(self, admission: Admission, queue_time: float) -> None:
        self._admission = admission
        self.queue_time = queue_time
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._admission._release()


class Admission:
    def __init__(self, max_running: int, max_waiting: int, retry_after_seconds: int) -> None:
        self._semaphore = asyncio.Semaphore(max_running)
        self._max_waiting = max_waiting
        self._retry_after = retry_after_seconds
        self.running = 0
        self.waiting = 0

    async def acquire(self) -> Slot:
        if self._semaphore.locked() and self.waiting >= self._max_waiting:
            raise OpenAIError(
                429,
                f"server busy: {self.running} requests running and {self.waiting} queued; retry later",
                code="queue_full",
                headers={"Retry-After": str(self._retry_after)},
            )
        start = time.monotonic()
        self._set(waiting=self.waiting + 1)
        try:
            await self._semaphore.acquire()
        finally:
            self._set(waiting=self.waiting - 1)
        self._set(running=self.running + 1)
        return Slot(self, time.monotonic() - start)

    def _release(self) -> None:
        self._set(running=self.running - 1)
        self._semaphore.release()

    def _set(self, *, running: int | None = None, waiting: int | None = None) -> None:
        if running is not None:
            self.running = running
            metrics.NUM_REQUESTS_RUNNING.set(running)
        if waiting is not None:
            self.waiting = waiting
            metrics.NUM_REQUESTS_WAITING.set(waiting)
