"""The engine supervisor (serve.engine.supervisor) on fake engines: a dead engine is replaced in place with
its adapters, a hung one (busy, no output) is killed and replaced while a slow but progressing one is not, new
requests get 503 `engine_restarting` or wait for the new engine, and a crash loop or a configuration error
gives up (the CLI then exits). The real thing (`kill -9`, SIGSTOP of vLLM's engine core) is
tests/e2e/test_engine_death.py."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from vllm import SamplingParams
from vllm.lora.request import LoRARequest
from vllm.v1.engine.exceptions import EngineDeadError

from core.models import load_tokenizer
from serve import cli, metrics
from serve.app import build_app
from serve.engine import supervisor as supervisor_module
from serve.engine.supervisor import EngineState, EngineSupervisor, EngineUnavailable, RestartPolicy
from serve.errors import as_openai_error
from serve.settings import parse_settings
from tests.unit.serve.test_http_fake_engine import FakeEngine


class Core:
    """A fake engine core process."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.exitcode: int | None = None
        self.name = "EngineCore"


class Engine(FakeEngine):
    """A fake engine with what the supervisor looks at: health, core processes, activity, adapters."""

    def __init__(self, tokenizer: Any, number: int) -> None:
        super().__init__(tokenizer)
        self.number = number
        self.dead = False
        self.core = Core(1000 + number)
        self.unfinished = 0
        self.last_output = 0.0
        self.loras: dict[int, LoRARequest] = {}
        self.shut_down = False

    async def check_health(self) -> None:
        if self.dead:
            raise EngineDeadError()

    def core_processes(self) -> list[Core]:
        return [self.core]

    def activity(self) -> tuple[int, float]:
        return self.unfinished, self.last_output

    async def add_lora(self, lora: LoRARequest) -> bool:
        self.loras[lora.lora_int_id] = lora
        return True

    async def remove_lora(self, lora_id: int) -> bool:
        self.loras.pop(lora_id, None)
        return True

    def shutdown(self) -> None:
        self.shut_down = True


class Factory:
    """Starts engines 1, 2, ... (or raises what `outcomes` holds, in order); `gate` blocks a start."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.calls = 0
        self.outcomes: list[BaseException | None] = []
        self.gate: threading.Event | None = None

    def __call__(self) -> Engine:
        self.calls += 1
        if self.gate is not None:
            assert self.gate.wait(10)
        outcome = self.outcomes.pop(0) if self.outcomes else None
        if outcome is not None:
            raise outcome
        return Engine(self.tokenizer, self.calls)


@pytest.fixture
def tokenizer(tiny_model_dir: Path) -> Any:
    return load_tokenizer(tiny_model_dir)


@pytest.fixture
def factory(tokenizer: Any) -> Factory:
    return Factory(tokenizer)


@pytest.fixture
def clock() -> list[float]:
    return [1000.0]


def make(
    factory: Factory, tokenizer: Any, clock: list[float], **policy: Any
) -> tuple[EngineSupervisor, Engine]:
    first = Engine(tokenizer, 0)
    settings = {"backoff_seconds": 0.0, "hang_timeout_seconds": 5.0, **policy}
    supervised = EngineSupervisor(factory, first, RestartPolicy(**settings), clock=lambda: clock[0])
    return supervised, first


def restarts(reason: str) -> float:
    return metrics.ENGINE_RESTARTS.labels(reason)._value.get()  # type: ignore[attr-defined, no-any-return]


async def run(engine: EngineSupervisor) -> str:
    params = SamplingParams(max_tokens=3)
    return "".join([o.choices[0].text async for o in engine.generate("r", [1, 2], params)])


def lora(number: int) -> LoRARequest:
    return LoRARequest(f"a{number}", number, f"/adapters/a{number}")


@pytest.mark.anyio
async def test_a_dead_engine_is_replaced_with_the_adapters_it_had(
    factory: Factory, tokenizer: Any, clock: list[float]
) -> None:
    supervised, first = make(factory, tokenizer, clock)
    assert await supervised.add_lora(lora(1)) and await supervised.add_lora(lora(2))
    assert await supervised.remove_lora(2)
    await supervised.watch()
    assert supervised.state is EngineState.RUNNING and factory.calls == 0, "a healthy engine is left alone"

    died_before = restarts("died")
    first.dead, first.core.exitcode = True, -9
    await supervised.watch()
    assert supervised.state is EngineState.RESTARTING
    assert restarts("died") == died_before + 1
    assert "EngineCore pid 1000 killed by SIGKILL" in (supervised.last_event or "")
    with pytest.raises(EngineUnavailable) as refused:
        await supervised.check_health()
    err = as_openai_error(refused.value)
    assert (err.status, err.code) == (503, "engine_restarting") and int(err.headers["Retry-After"]) >= 1
    with pytest.raises(EngineUnavailable):
        await run(supervised)  # no --engine-wait-seconds: refused at once

    await supervised.wait_settled()
    assert supervised.state is EngineState.RUNNING and supervised.restarts == 1
    assert first.shut_down
    second = supervised._engine
    assert isinstance(second, Engine) and second.number == 1
    assert list(second.loras) == [1], "the adapters loaded before the death (and only those) are back"
    assert await run(supervised) == "xxx"
    assert supervised.status()["core_pids"] == [1001]


@pytest.mark.anyio
async def test_a_new_request_waits_for_the_new_engine_up_to_engine_wait_seconds(
    factory: Factory, tokenizer: Any, clock: list[float]
) -> None:
    supervised, first = make(factory, tokenizer, clock, wait_seconds=10.0)
    factory.gate = threading.Event()
    first.dead = True
    await supervised.watch()
    request = asyncio.ensure_future(run(supervised))
    await asyncio.sleep(0.05)
    assert not request.done(), "the request waits while the engine starts"
    factory.gate.set()
    assert await asyncio.wait_for(request, 10) == "xxx"


@pytest.mark.anyio
async def test_a_busy_engine_without_output_is_hung_a_slow_one_with_output_is_not(
    factory: Factory, tokenizer: Any, clock: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    killed: list[tuple[int, int]] = []
    monkeypatch.setattr(supervisor_module.os, "kill", lambda pid, sig: killed.append((pid, sig)))
    supervised, first = make(factory, tokenizer, clock, hang_timeout_seconds=5.0)
    first.last_output = clock[0] - 100  # long idle: idle time is not a hang
    first.unfinished = 1
    await supervised.watch()
    for _ in range(6):  # a long request: 12 s old, but an output every 2 s
        clock[0] += 2.0
        first.last_output = clock[0]
        await supervised.watch()
    assert supervised.state is EngineState.RUNNING and not killed
    clock[0] += 4.9
    await supervised.watch()
    assert supervised.state is EngineState.RUNNING
    hung_before = restarts("hung")
    clock[0] += 0.2
    await supervised.watch()
    assert supervised.state is EngineState.RESTARTING
    assert killed == [(1000, 9)], "the hung engine core is killed (SIGKILL works on a stopped process)"
    assert restarts("hung") == hung_before + 1
    assert "no output for 5.1 s with 1 requests in flight; SIGKILL sent to EngineCore pid 1000" in (
        supervised.last_event or ""
    )
    await supervised.wait_settled()
    assert supervised.state is EngineState.RUNNING


@pytest.mark.anyio
async def test_a_crash_loop_gives_up_after_engine_restart_max_failures(
    factory: Factory, tokenizer: Any, clock: list[float]
) -> None:
    supervised, first = make(factory, tokenizer, clock, max_failures=2)
    factory.outcomes = [RuntimeError("Engine core initialization failed")] * 5
    first.dead = True
    await supervised.watch()
    await supervised.wait_settled()
    assert supervised.state is EngineState.FAILED
    assert factory.calls == 2, "a death and two failed starts: three failures > 2"
    assert "3 engine failures within 300 s" in (supervised.failure or "")
    assert "Engine core initialization failed" in (supervised.failure or "")
    with pytest.raises(EngineUnavailable) as refused:
        await supervised.check_health()
    assert as_openai_error(refused.value).code == "engine_dead"


@pytest.mark.anyio
async def test_failures_outside_the_window_do_not_count(
    factory: Factory, tokenizer: Any, clock: list[float]
) -> None:
    supervised, _ = make(factory, tokenizer, clock, max_failures=1, window_seconds=60.0)
    for _ in range(3):
        engine = supervised._engine
        assert isinstance(engine, Engine)
        engine.dead = True
        await supervised.watch()
        await supervised.wait_settled()
        assert supervised.state is EngineState.RUNNING
        clock[0] += 61
    assert supervised.restarts == 3


@pytest.mark.anyio
async def test_a_start_that_fails_on_its_configuration_is_not_retried(
    factory: Factory, tokenizer: Any, clock: list[float]
) -> None:
    supervised, first = make(factory, tokenizer, clock, max_failures=10)
    factory.outcomes = [ValueError("max_model_len is larger than the model's")]
    first.dead = True
    await supervised.watch()
    await supervised.wait_settled()
    assert supervised.state is EngineState.FAILED and factory.calls == 1
    assert "not retried" in (supervised.failure or "")


@pytest.mark.anyio
async def test_probes_show_the_engine_state(factory: Factory, tokenizer: Any, clock: list[float]) -> None:
    supervised, first = make(factory, tokenizer, clock, max_failures=1)
    app = build_app(parse_settings(["--model", "/models/fake", "--served-model-name", "fake"]), supervised)
    factory.gate = threading.Event()
    transport = httpx.ASGITransport(app, raise_app_exceptions=False)  # errors become responses
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        ready = await client.get("/ready")
        assert ready.status_code == 200 and ready.json()["engine"]["state"] == "running"
        first.dead = True
        await supervised.watch()
        ready = await client.get("/ready")
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "engine_restarting"
        assert ready.json()["engine"]["state"] == "restarting" and "retry-after" in ready.headers
        health = await client.get("/health")
        assert health.status_code == 200, "alive while healing: a liveness probe must not kill the process"
        assert health.json()["engine"]["state"] == "restarting"
        completion = {"model": "fake", "prompt": "hi", "max_tokens": 2}
        refused = await client.post("/v1/completions", json=completion)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_restarting"
        assert (await client.get("/v1/models")).status_code == 200, "what needs no engine still works"
        factory.gate.set()
        await supervised.wait_settled()
        assert (await client.post("/v1/completions", json=completion)).status_code == 200
        body = (await client.get("/health")).json()["engine"]
        assert body["state"] == "running" and body["restarts"] == 1

        factory.outcomes = [RuntimeError("boom")]
        current = supervised._engine
        assert isinstance(current, Engine)
        current.dead = True
        await supervised.watch()
        await supervised.wait_settled()
        for probe in ("/health", "/ready"):
            reply = await client.get(probe)
            assert reply.status_code == 503 and reply.json()["error"]["code"] == "engine_dead"
            assert reply.json()["engine"]["state"] == "failed"


@pytest.mark.anyio
async def test_the_server_exits_once_the_supervisor_gives_up(
    factory: Factory, tokenizer: Any, clock: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    import uvicorn

    now = [500.0]
    monkeypatch.setattr(cli.time, "monotonic", lambda: now[0])
    supervised, first = make(factory, tokenizer, clock, max_failures=0)
    state: Callable[[], Any] = type("S", (), {})
    state.engine, state.engine_dead, state.draining, state.in_flight = supervised, False, False, 0  # type: ignore[attr-defined]
    server = cli.DrainingServer(uvicorn.Config(app=None), state, drain_timeout=30)  # type: ignore[arg-type]
    assert not await server.on_tick(1) and not server.engine_died
    first.dead, first.core.exitcode = True, 1
    await server.on_tick(2)
    await supervised.wait_settled()
    await server.on_tick(3)
    assert server.engine_died and state.engine_dead  # type: ignore[attr-defined]
    assert "1 engine failures within 300 s" in server.engine_failure
    assert "exit code 1" in server.engine_failure
    assert factory.calls == 0, "--engine-restart-max 0: no restart at all"
    now[0] += cli.ENGINE_DEAD_MIN_LINGER_SECONDS + 0.1
    assert await server.on_tick(4)


@pytest.mark.anyio
async def test_an_exited_core_process_is_a_death_before_the_engine_says_so(
    factory: Factory, tokenizer: Any, clock: list[float]
) -> None:
    """With data parallel, vLLM stops the other ranks before it marks itself dead (seconds)."""
    supervised, first = make(factory, tokenizer, clock)
    first.core.exitcode = -9  # check_health still passes
    await supervised.watch()
    assert supervised.state is EngineState.RESTARTING
    assert supervised.last_event == "died: EngineCore pid 1000 killed by SIGKILL"
    await supervised.wait_settled()
