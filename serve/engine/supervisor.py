"""`EngineSupervisor`: an `Engine` that forwards to the current engine and replaces it in place when its
engine core dies or hangs, so that the API process (its adapters, its listening socket) outlives the engine.

Invariants:
- the app and the pipeline reach the engine only through the supervisor; `_engine` is swapped in one
  assignment, and only once the new engine is started and every adapter that was loaded into the old one
  (at start-up or at run time) is loaded into it again;
- `state` is `running` (requests go straight to the engine: no per-token cost), `restarting` (new requests
  wait up to `wait_seconds`, then `EngineUnavailable`), or `failed` (for good: the process is about to exit);
- a hang is judged by progress, never by request age: the engine is hung when it has unfinished requests
  and produced no output for `hang_timeout_seconds`;
- more than `max_failures` failures (deaths, hangs and failed starts) within `window_seconds` is `failed`,
  and so is a start that fails on its configuration (never retried).

The supervisor knows nothing about settings: it gets a factory (a blocking callable returning a started
engine, run in a thread). `watch()` is its clock: the server calls it every tick (serve.cli).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

from core.errors import StackError
from serve import metrics
from serve.engine.protocol import Engine, EngineOutput

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

log = logging.getLogger(__name__)

EngineFactory = Callable[[], Engine]

# A start that fails with one of these failed on its configuration (vLLM validates its arguments with
# ValueError/pydantic, a missing model folder is an OSError): retrying cannot help.
CONFIG_ERRORS: tuple[type[BaseException], ...] = (StackError, ValueError, TypeError, FileNotFoundError)


class EngineState(StrEnum):
    RUNNING = "running"
    RESTARTING = "restarting"
    FAILED = "failed"


class EngineUnavailable(RuntimeError):
    """No engine to run a request on: one is being started (`restarting`) or none ever will be (`failed`).
    `retry_after`: seconds a client should wait before retrying."""

    def __init__(self, state: EngineState, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.state = state
        self.retry_after = retry_after


class CoreProcess(Protocol):
    """An engine core process as `multiprocessing` describes it."""

    @property
    def pid(self) -> int | None: ...

    @property
    def exitcode(self) -> int | None: ...

    @property
    def name(self) -> str: ...


class Observable(Protocol):
    """What an engine may offer beyond `Engine` for supervision (`VLLMEngine` does)."""

    def core_processes(self) -> Sequence[CoreProcess]:
        """The engine's core processes (one per local data-parallel rank)."""
        ...

    def activity(self) -> tuple[int, float]:
        """(unfinished requests, `time.monotonic()` of the engine's last output; 0.0 if none yet)."""
        ...


@dataclass(frozen=True)
class RestartPolicy:
    max_failures: int = 3
    window_seconds: float = 300.0
    backoff_seconds: float = 1.0
    max_backoff_seconds: float = 30.0
    hang_timeout_seconds: float = 60.0  # 0: no hang detection
    wait_seconds: float = 0.0  # how long a new request waits for a restarting engine


def describe_exit(processes: Sequence[CoreProcess]) -> str:
    """How each engine core process ended, e.g. `EngineCore pid 123 killed by SIGKILL`."""
    parts = []
    for proc in processes:
        code = proc.exitcode
        if code is None:
            how = "still running"
        elif code < 0:
            try:
                how = f"killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"killed by signal {-code}"
        else:
            how = f"exit code {code}"
        parts.append(f"{proc.name} pid {proc.pid} {how}")
    return ", ".join(parts)


class EngineSupervisor:
    """An `Engine` that keeps one alive (see the module docstring)."""

    def __init__(
        self,
        factory: EngineFactory,
        engine: Engine,
        policy: RestartPolicy | None = None,
        *,
        start_seconds: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._factory = factory
        self._engine = engine
        self._policy = policy or RestartPolicy()
        self._clock = clock
        self._start_seconds = start_seconds  # how long a start took (for Retry-After)
        self._failures: deque[float] = deque()
        self._loras: dict[int, LoRARequest] = {}
        self._ready = asyncio.Event()
        self._ready.set()
        self._task: asyncio.Task[None] | None = None
        self._busy_since: float | None = None
        self.state = EngineState.RUNNING
        self.restarts = 0
        self.failure: str | None = None  # why it gave up (state `failed`)
        self.last_event: str | None = None

    # -- the Engine protocol ------------------------------------------------------------------------------

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self._engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self._engine.max_model_len

    @property
    def vllm_config(self) -> Any:
        """The current engine's vLLM configuration (None for an engine that has none)."""
        return getattr(self._engine, "vllm_config", None)

    @property
    def default_sampling(self) -> dict[str, Any]:
        return self._engine.default_sampling

    def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        lora: LoRARequest | None = None,
    ) -> AsyncGenerator[EngineOutput, None]:
        if self.state is EngineState.RUNNING:  # the engine's own generator: nothing added per token
            return self._engine.generate(request_id, prompt_token_ids, params, lora)
        return self._generate_later(request_id, prompt_token_ids, params, lora)

    async def _generate_later(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        lora: LoRARequest | None,
    ) -> AsyncGenerator[EngineOutput, None]:
        engine = await self._running_engine()
        async for out in engine.generate(request_id, prompt_token_ids, params, lora):
            yield out

    async def abort(self, request_id: str) -> None:
        if self.state is EngineState.RUNNING:
            await self._engine.abort(request_id)

    async def add_lora(self, lora: LoRARequest) -> bool:
        engine = await self._running_engine()
        accepted = await engine.add_lora(lora)
        if accepted:
            self._loras[lora.lora_int_id] = lora
        return accepted

    async def remove_lora(self, lora_id: int) -> bool:
        self._loras.pop(lora_id, None)
        if self.state is not EngineState.RUNNING:
            return True  # the next engine will not get it
        return await self._engine.remove_lora(lora_id)

    async def check_health(self) -> None:
        if self.state is not EngineState.RUNNING:
            raise self._unavailable()
        await self._engine.check_health()

    def kv_cache_usage(self) -> float | None:
        return self._engine.kv_cache_usage() if self.state is EngineState.RUNNING else None

    def shutdown(self) -> None:
        if self._task is not None:
            self._task.cancel()
        _retire(self._engine)

    # -- supervision ---------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The state as `/health` and `/ready` show it."""
        status: dict[str, Any] = {"state": str(self.state), "restarts": self.restarts}
        if self.last_event:
            status["last_event"] = self.last_event
        if self.failure:
            status["failure"] = self.failure
        procs = self._processes(self._engine)
        if procs and self.state is EngineState.RUNNING:
            status["core_pids"] = [p.pid for p in procs]
        return status

    async def watch(self) -> None:
        """One look at the running engine: a death or a hang starts its replacement (non-blocking)."""
        if self.state is not EngineState.RUNNING:
            return
        engine = self._engine
        procs = self._processes(engine)
        try:
            # An exited core process is a death even before the engine says so: with data parallel, vLLM
            # first stops the other ranks (seconds) and only then marks itself dead.
            exited = [p for p in procs if p.exitcode is not None]
            if exited:
                raise RuntimeError("an engine core process exited")
            await engine.check_health()
        except Exception as exc:
            cause = describe_exit(exited or procs) or f"{type(exc).__name__}: {exc}"
            self._begin_restart("died", cause)
            return
        if (hang := self._hang(engine)) is not None:
            killed = self._kill_cores(engine)
            self._begin_restart("hung", f"{hang}; SIGKILL sent to {killed or 'no process'}")

    async def wait_settled(self) -> None:
        """Until no restart is under way (tests; the restart itself runs as a task)."""
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _hang(self, engine: Engine) -> str | None:
        timeout = self._policy.hang_timeout_seconds
        activity = getattr(engine, "activity", None)
        if timeout <= 0 or activity is None:
            return None
        unfinished, last_output = activity()
        now = self._clock()
        if unfinished == 0:
            self._busy_since = None
            return None
        if self._busy_since is None:
            self._busy_since = now
        quiet = now - max(last_output, self._busy_since)
        if quiet < timeout:
            return None
        return f"no output for {quiet:.1f} s with {unfinished} requests in flight"

    @staticmethod
    def _processes(engine: Engine) -> Sequence[CoreProcess]:
        core_processes = getattr(engine, "core_processes", None)
        return list(core_processes()) if core_processes is not None else []

    def _kill_cores(self, engine: Engine) -> str:
        """SIGKILL every engine core process still alive (a stopped process dies of it too); the engine then
        sees its core die and fails the requests in flight, as after any death. Says which were killed."""
        killed = []
        for proc in self._processes(engine):
            if proc.exitcode is None and proc.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                    killed.append(f"{proc.name} pid {proc.pid}")
        return ", ".join(killed)

    def _unavailable(self) -> EngineUnavailable:
        if self.state is EngineState.FAILED:
            why = f"the inference engine failed for good ({self.failure}); the server is exiting"
            return EngineUnavailable(self.state, why, 10)
        return EngineUnavailable(
            self.state,
            "the inference engine is restarting; retry later",
            max(1, math.ceil(self._start_seconds)),
        )

    async def _running_engine(self) -> Engine:
        """The engine once it runs, waiting up to `wait_seconds` for a restart to finish."""
        if self.state is EngineState.RESTARTING and self._policy.wait_seconds > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready.wait(), self._policy.wait_seconds)
        if self.state is not EngineState.RUNNING:
            raise self._unavailable()
        return self._engine

    def _record_failure(self) -> int:
        """Note a failure now; the failures within the window, this one included."""
        now = self._clock()
        self._failures.append(now)
        while self._failures and now - self._failures[0] > self._policy.window_seconds:
            self._failures.popleft()
        return len(self._failures)

    def _begin_restart(self, reason: str, cause: str) -> None:
        self.state = EngineState.RESTARTING
        self._ready.clear()
        self._busy_since = None
        self.last_event = f"{reason}: {cause}"
        metrics.ENGINE_RESTARTS.labels(reason).inc()
        log.error("the engine core %s (%s): replacing it; /ready answers 503 until it is back", reason, cause)
        old = self._engine
        self._task = asyncio.get_running_loop().create_task(self._replace(old, self._record_failure()))

    def _fail(self, why: str) -> None:
        self.state = EngineState.FAILED
        self.failure = why
        self._ready.set()
        log.error("the engine is not restarted again: %s", why)

    async def _replace(self, old: Engine, failures: int) -> None:
        """Retire `old`, then start engines (backing off) until one runs or the policy gives up."""
        await asyncio.to_thread(_retire, old)
        policy = self._policy
        while True:
            if failures > policy.max_failures:
                self._fail(
                    f"{failures} engine failures within {policy.window_seconds:.0f} s "
                    f"(--engine-restart-max {policy.max_failures}); last: {self.last_event}"
                )
                return
            delay = min(policy.backoff_seconds * 2 ** (failures - 1), policy.max_backoff_seconds)
            await asyncio.sleep(delay)
            started = self._clock()
            try:
                engine = await asyncio.to_thread(self._factory)
            except CONFIG_ERRORS as err:
                self._fail(f"a new engine failed on its configuration (not retried): {err}")
                return
            except Exception as err:
                self.last_event = f"start failed: {type(err).__name__}: {err}"
                log.error("starting a new engine failed (%s: %s)", type(err).__name__, err)
                failures = self._record_failure()
                continue
            try:
                await self._reload_adapters(engine)
            except Exception as err:
                self.last_event = f"adapter reload failed: {err}"
                log.error("a new engine refused the adapters it must serve (%s)", err)
                await asyncio.to_thread(_retire, engine)
                failures = self._record_failure()
                continue
            self._start_seconds = self._clock() - started
            self._engine = engine
            self.restarts += 1
            self.state = EngineState.RUNNING
            self._ready.set()
            log.info(
                "the engine is back after %.1f s (%d adapters loaded again): ready",
                self._start_seconds,
                len(self._loras),
            )
            return

    async def _reload_adapters(self, engine: Engine) -> None:
        for lora in list(self._loras.values()):
            if not await engine.add_lora(lora):
                raise RuntimeError(f"adapter {lora.lora_name!r} was refused")


def _retire(engine: Engine) -> None:
    """Shut a dead engine down (blocking; its requests in flight end with the engine's dead error)."""
    try:
        engine.shutdown()
    except Exception as err:  # a dead engine's shutdown may trip over its own corpse
        log.warning("shutting down the dead engine: %s: %s", type(err).__name__, err)
