"""The registry's routing and life-cycle rules, with an engine stand-in that records what it was asked
(the real engine is exercised in tests/e2e/test_lora_*.py)."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import pytest

from adapters.base import BaseModelProfile
from adapters.discovery import AdapterSpec
from adapters.errors import AdapterError, AdapterExists, AdapterNotFound
from adapters.registry import AdapterRegistry
from adapters.routing import ModelNotFound
from core.errors import ConfigError

pytestmark = pytest.mark.anyio


class RecordingEngine:
    def __init__(self, accept: bool = True) -> None:
        self.accept = accept
        self.calls: list[tuple[str, Any]] = []

    async def add_lora(self, lora: Any) -> bool:
        self.calls.append(("add", (lora.lora_name, lora.lora_int_id, lora.lora_path)))
        return self.accept

    async def remove_lora(self, lora_id: int) -> bool:
        self.calls.append(("remove", lora_id))
        return True


@pytest.fixture
def engine() -> RecordingEngine:
    return RecordingEngine()


@pytest.fixture
def registry(profile: BaseModelProfile, engine: RecordingEngine) -> AdapterRegistry:
    return AdapterRegistry(profile, engine, max_lora_rank=8)


async def test_load_routes_the_name_to_a_lora_request(
    registry: AdapterRegistry, engine: RecordingEngine, good_adapter: Path
) -> None:
    entry = await registry.load("sql", good_adapter)
    route = registry.resolve("sql")
    assert route.lora is not None
    assert (route.lora.lora_name, route.lora.lora_int_id, route.lora.lora_path) == (
        "sql",
        entry.lora_id,
        str(good_adapter),
    )
    assert engine.calls == [("add", ("sql", entry.lora_id, str(good_adapter)))]
    assert registry.resolve("tiny").lora is None
    assert [(m.id, m.parent) for m in registry.models()] == [("tiny", None), ("sql", "tiny")]


async def test_unknown_model_is_model_not_found(registry: AdapterRegistry) -> None:
    with pytest.raises(ModelNotFound) as err:
        registry.resolve("nope")
    assert err.value.model == "nope"


async def test_ids_are_stable_per_registration_and_never_reused(
    registry: AdapterRegistry, engine: RecordingEngine, good_adapter: Path
) -> None:
    first = await registry.load("a", good_adapter)
    second = await registry.load("b", good_adapter)
    assert registry.resolve("a").lora.lora_int_id == first.lora_id  # type: ignore[union-attr]
    await registry.unload("a")
    again = await registry.load("a", good_adapter)
    assert len({first.lora_id, second.lora_id, again.lora_id}) == 3
    assert 0 not in {first.lora_id, second.lora_id, again.lora_id}
    assert ("remove", first.lora_id) in engine.calls


async def test_duplicate_and_base_names_are_refused(registry: AdapterRegistry, good_adapter: Path) -> None:
    await registry.load("a", good_adapter)
    with pytest.raises(AdapterExists, match="already loaded"):
        await registry.load("a", good_adapter)
    with pytest.raises(AdapterExists, match="base model"):
        await registry.load("tiny", good_adapter)


async def test_concurrent_loads_of_one_name_register_it_once(
    registry: AdapterRegistry, engine: RecordingEngine, good_adapter: Path
) -> None:
    results = await asyncio.gather(
        *(registry.load("x", good_adapter) for _ in range(4)), return_exceptions=True
    )
    assert sum(not isinstance(r, BaseException) for r in results) == 1
    assert all(isinstance(r, AdapterExists) for r in results if isinstance(r, BaseException))
    assert [c for c in engine.calls if c[0] == "add"] == [("add", ("x", 1, str(good_adapter)))]


async def test_invalid_adapter_never_reaches_the_engine(
    registry: AdapterRegistry, engine: RecordingEngine, wrong_base_adapter: Path
) -> None:
    with pytest.raises(AdapterError, match="different model"):
        await registry.load("bad", wrong_base_adapter)
    assert engine.calls == []
    assert [m.id for m in registry.models()] == ["tiny"]


async def test_engine_refusal_is_an_adapter_error(profile: BaseModelProfile, good_adapter: Path) -> None:
    registry = AdapterRegistry(profile, RecordingEngine(accept=False), max_lora_rank=8)
    with pytest.raises(AdapterError, match="engine refused"):
        await registry.load("a", good_adapter)
    with pytest.raises(ModelNotFound):
        registry.resolve("a")


async def test_unload_waits_for_in_flight_requests(
    registry: AdapterRegistry, engine: RecordingEngine, good_adapter: Path
) -> None:
    entry = await registry.load("a", good_adapter)
    route = registry.resolve("a")
    with registry.lease(route):
        unload = asyncio.create_task(registry.unload("a"))
        await asyncio.sleep(0.05)
        assert not unload.done()
        assert ("remove", entry.lora_id) not in engine.calls
        with pytest.raises(ModelNotFound):  # no new requests while it drains
            registry.resolve("a")
        assert [m.id for m in registry.models()] == ["tiny"]
    await asyncio.wait_for(unload, 1)
    assert engine.calls[-1] == ("remove", entry.lora_id)
    assert entry.requests == 1
    assert entry.in_flight == 0
    with pytest.raises(AdapterNotFound):
        await registry.unload("a")


async def test_unload_cancels_the_requests_that_outlive_its_timeout(
    profile: BaseModelProfile, engine: RecordingEngine, good_adapter: Path
) -> None:
    registry = AdapterRegistry(profile, engine, max_lora_rank=8, unload_timeout=0.2)
    entry = await registry.load("a", good_adapter)
    released, stuck = asyncio.Event(), asyncio.Event()

    async def request(done: asyncio.Event) -> None:
        with registry.lease(registry.resolve("a")):
            await done.wait()

    short = asyncio.create_task(request(released))
    long = asyncio.create_task(request(stuck))  # never set: a stream that would outlive any unload
    await asyncio.sleep(0)
    assert entry.in_flight == 2
    started = asyncio.get_running_loop().time()
    unload = asyncio.create_task(registry.unload("a"))
    await asyncio.sleep(0.05)
    released.set()  # finishes within the timeout: not cancelled
    await asyncio.wait_for(unload, 2)
    assert asyncio.get_running_loop().time() - started >= 0.2
    assert short.done() and not short.cancelled()
    assert long.cancelled()
    assert (entry.cancelled, entry.in_flight, entry.requests) == (1, 0, 2)
    assert engine.calls[-1] == ("remove", entry.lora_id)
    with pytest.raises(ModelNotFound):
        registry.resolve("a")


async def test_unload_ends_even_when_a_cancelled_request_does_not(
    profile: BaseModelProfile,
    engine: RecordingEngine,
    good_adapter: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr("adapters.registry.CANCEL_GRACE_SECONDS", 0.1)
    registry = AdapterRegistry(profile, engine, max_lora_rank=8, unload_timeout=0.1)
    entry = await registry.load("a", good_adapter)
    finish = asyncio.Event()

    async def stubborn() -> None:
        with registry.lease(registry.resolve("a")):
            try:
                await finish.wait()
            except asyncio.CancelledError:
                await finish.wait()  # ignores the cancellation

    holder = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    await asyncio.wait_for(registry.unload("a"), 2)
    assert engine.calls[-1] == ("remove", entry.lora_id)
    assert "did not end; removing it anyway" in caplog.text
    with pytest.raises(ModelNotFound):
        registry.resolve("a")
    finish.set()
    await holder
    assert entry.in_flight == 0


async def test_a_lease_on_an_unloaded_or_replaced_adapter_is_refused(
    registry: AdapterRegistry, good_adapter: Path
) -> None:
    await registry.load("a", good_adapter)
    stale = registry.resolve("a")
    await registry.unload("a")
    with pytest.raises(ModelNotFound) as err, registry.lease(stale):
        pass
    assert err.value.model == "a"
    await registry.load("a", good_adapter)  # same name, new id: the old route must not reach it
    with pytest.raises(ModelNotFound), registry.lease(stale):
        pass
    with registry.lease(registry.resolve("a")), registry.lease(registry.resolve("tiny")):
        pass
    assert registry.get("a").requests == 1


async def test_load_all_reports_every_bad_adapter(
    registry: AdapterRegistry, good_adapter: Path, wrong_base_adapter: Path, tmp_path: Path
) -> None:
    truncated = tmp_path / "truncated"
    shutil.copytree(good_adapter, truncated)
    (truncated / "adapter_model.safetensors").write_bytes(b"\x10")
    specs = [
        AdapterSpec(name="good", path=good_adapter),
        AdapterSpec(name="wrong", path=wrong_base_adapter),
        AdapterSpec(name="trunc", path=truncated),
    ]
    with pytest.raises(ConfigError) as err:
        await registry.load_all(specs)
    assert "wrong: " in str(err.value)
    assert "trunc: " in str(err.value)
    assert "good" not in str(err.value).split(":")[1]
