"""The adapter registry: which adapters the server serves, under which names and vLLM ids.

It is the server's `ModelRouter` (adapters/routing.py) whenever LoRA is enabled.

Invariants:
- a name maps to one adapter at a time, with an int id that stays the same while it is registered; ids are
  never reused, so vLLM's caches can never serve an old adapter under a new name or path;
- an adapter is validated (adapters.validation) and accepted by the engine before it becomes routable;
- loads and unloads of one name are serialised by that name's `asyncio.Lock`;
- unloading first stops routing new requests to the adapter, then waits for its in-flight requests (those
  holding a `lease`) to finish, at most `unload_timeout` seconds: then the tasks still holding one are
  cancelled (their engine requests are aborted), and only then is the adapter removed from the engine. So an
  unload always ends, and once it has, no request runs on the adapter (its folder may be changed);
- every registered adapter stays routable whatever `--max-loras` is: vLLM keeps the most recently used
  ones resident and reloads the others from their path (each `LoRARequest` carries it).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from adapters.base import BaseModelProfile
from adapters.discovery import AdapterSpec
from adapters.errors import AdapterError, AdapterExists, AdapterNotFound
from adapters.routing import ModelEntry, ModelNotFound, Route, base_entries
from adapters.validation import AdapterInfo, validate_adapter
from core.errors import ConfigError

if TYPE_CHECKING:
    from vllm.lora.request import LoRARequest

log = logging.getLogger(__name__)

# After cancelling the requests that outlived an unload's timeout: how long they get to unwind (abort their
# engine request) before the adapter is removed regardless.
CANCEL_GRACE_SECONDS = 5.0


class LoRAEngine(Protocol):
    """The part of the engine the registry drives (`serve.engine.protocol.Engine` has it)."""

    async def add_lora(self, lora: LoRARequest) -> bool: ...

    async def remove_lora(self, lora_id: int) -> bool: ...


@dataclass
class AdapterEntry:
    """One registered adapter. `requests` counts requests served; `in_flight` those still running (counted
    from `holders`, the tasks holding a lease); `cancelled` those an unload cancelled after its timeout."""

    name: str
    lora_id: int
    info: AdapterInfo
    loaded_at: datetime
    requests: int = 0
    unloading: bool = False
    cancelled: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    holders: Counter[asyncio.Task[Any] | None] = field(default_factory=Counter, repr=False)

    def __post_init__(self) -> None:
        self.idle.set()

    @property
    def in_flight(self) -> int:
        return sum(self.holders.values())

    @property
    def path(self) -> Path:
        return self.info.path

    def lora_request(self) -> LoRARequest:
        from vllm.lora.request import LoRARequest

        return LoRARequest(self.name, self.lora_id, str(self.info.path))


class AdapterRegistry:
    """Routes `model` names to the base model or a registered adapter; loads and unloads adapters."""

    def __init__(
        self,
        base: BaseModelProfile,
        engine: LoRAEngine,
        *,
        max_lora_rank: int,
        unload_timeout: float = 30.0,
        served_aliases: tuple[str, ...] = (),
    ) -> None:
        self._base = base
        self._served_aliases = served_aliases
        self._engine = engine
        self._max_lora_rank = max_lora_rank
        self._unload_timeout = unload_timeout
        self._entries: dict[str, AdapterEntry] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._ids = itertools.count(1)  # vLLM reserves 0

    # --- ModelRouter -------------------------------------------------------------------------------
    @property
    def base_name(self) -> str:
        return self._base.name

    def resolve(self, model: str) -> Route:
        if model == self._base.name or model in self._served_aliases:
            return Route(self._base.name, None)
        entry = self._entries.get(model)
        if entry is None or entry.unloading:
            raise ModelNotFound(model)
        return Route(model, entry.lora_request())

    def models(self) -> list[ModelEntry]:
        rows = base_entries(self._base.name, str(self._base.path), self._served_aliases)
        rows += [ModelEntry(e.name, str(e.path), self._base.name) for e in self.adapters()]
        return rows

    @contextmanager
    def lease(self, route: Route) -> Iterator[None]:
        """Hold the route's adapter for the duration of a request (an unload waits for it, at most its
        timeout, then cancels the task holding it); 404 if the adapter was unloaded (or replaced) since
        `resolve`."""
        if route.lora is None:
            yield
            return
        entry = self._entries.get(route.model)
        if entry is None or entry.unloading or entry.lora_id != route.lora.lora_int_id:
            raise ModelNotFound(route.model)
        task = asyncio.current_task()
        entry.requests += 1
        entry.holders[task] += 1
        entry.idle.clear()
        try:
            yield
        finally:
            entry.holders[task] -= 1
            if entry.holders[task] == 0:
                del entry.holders[task]
            if not entry.holders:
                entry.idle.set()

    # --- management --------------------------------------------------------------------------------
    def adapters(self) -> list[AdapterEntry]:
        """Registered adapters that take requests, in load order."""
        return [e for e in self._entries.values() if not e.unloading]

    def get(self, name: str) -> AdapterEntry:
        entry = self._entries.get(name)
        if entry is None or entry.unloading:
            raise AdapterNotFound(f"no adapter named {name!r} is loaded")
        return entry

    def lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def load(self, name: str, path: Path) -> AdapterEntry:
        """Validate the adapter, hand it to the engine, then make it routable under `name`."""
        if name == self._base.name:
            raise AdapterExists(f"{name!r} is the served base model's name")
        if name in self._served_aliases:
            raise AdapterExists(f"{name!r} is a served name of the base model (--served-model-name)")
        async with self.lock(name):
            if name in self._entries:
                raise AdapterExists(f"an adapter named {name!r} is already loaded (unload it first)")
            info = await asyncio.to_thread(
                validate_adapter, Path(path), self._base, max_lora_rank=self._max_lora_rank
            )
            entry = AdapterEntry(name, next(self._ids), info, datetime.now(UTC))
            try:
                accepted = await self._engine.add_lora(entry.lora_request())
            except Exception as err:  # the engine's own refusal, whatever its type
                raise AdapterError(f"the engine refused adapter {name!r}: {err}") from None
            if not accepted:
                raise AdapterError(f"the engine refused adapter {name!r}")
            self._entries[name] = entry
            log.info("adapter %r loaded from %s (id %d, rank %d)", name, info.path, entry.lora_id, info.rank)
            return entry

    async def unload(self, name: str) -> AdapterEntry:
        """Stop routing to `name`, let its in-flight requests finish (cancelling those still running after
        `unload_timeout` seconds), then remove it from the engine."""
        async with self.lock(name):
            entry = self.get(name)
            entry.unloading = True
            try:
                await asyncio.wait_for(entry.idle.wait(), self._unload_timeout)
            except TimeoutError:
                await self._cancel_in_flight(entry)
            del self._entries[name]
            await self._engine.remove_lora(entry.lora_id)
            log.info("adapter %r unloaded after %d requests", name, entry.requests)
            return entry

    async def _cancel_in_flight(self, entry: AdapterEntry) -> None:
        entry.cancelled = entry.in_flight
        log.warning(
            "adapter %r: %d requests still in flight after the %.1f s unload timeout: cancelling them",
            entry.name,
            entry.in_flight,
            self._unload_timeout,
        )
        for task in list(entry.holders):
            if task is not None:
                task.cancel()
        try:
            await asyncio.wait_for(entry.idle.wait(), CANCEL_GRACE_SECONDS)
        except TimeoutError:
            log.error(
                "adapter %r: %d cancelled requests did not end; removing it anyway",
                entry.name,
                entry.in_flight,
            )

    async def load_all(self, specs: Iterable[AdapterSpec]) -> None:
        """Load the start-up adapters; every problem is reported together as one `ConfigError`."""
        problems = []
        for spec in specs:
            try:
                await self.load(spec.name, spec.path)
            except (AdapterError, AdapterExists) as err:
                problems.append(f"{spec.name}: {err}")
        if problems:
            raise ConfigError("invalid LoRA adapters: " + "; ".join(problems))
