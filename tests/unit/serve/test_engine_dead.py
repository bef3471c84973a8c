"""An engine dead for good, on the HTTP layer and the CLI's watchdog, without the supervisor (an app built on
a plain engine, as with `--engine-restart-max 0` once the supervisor gives up; the supervised path is
tests/unit/serve/test_engine_supervisor.py, the real thing tests/e2e/test_engine_death.py): vLLM's
`EngineDeadError` is 503 `engine_dead` with Retry-After wherever it surfaces, /ready and /health turn 503,
new requests are refused before they reach the engine, and the watchdog stops the server (non-zero exit)
within its linger bounds."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from vllm.v1.engine.exceptions import EngineDeadError

from core.models import load_tokenizer
from serve import cli
from serve.app import build_app
from serve.errors import ENGINE_DEAD_RETRY_AFTER_SECONDS, as_openai_error
from serve.settings import parse_settings
from tests.unit.serve.test_http_fake_engine import FakeEngine


class DyingEngine(FakeEngine):
    """The fake engine, which dies (raises EngineDeadError, as AsyncLLM does once its engine core is gone)
    when `dead` is set, or by itself after `die_after` outputs; its health check then raises too."""

    def __init__(self, tokenizer: Any) -> None:
        super().__init__(tokenizer)
        self.dead = False
        self.die_after: int | None = None
        self.requests = 0

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: Any, lora: Any = None
    ) -> AsyncGenerator[Any, None]:
        self.requests += 1
        step = 0
        async for out in super().generate(request_id, prompt_token_ids, params, lora):
            self.dead = self.dead or step == self.die_after
            if self.dead:
                raise EngineDeadError()
            step += 1
            yield out

    async def check_health(self) -> None:
        if self.dead:
            raise EngineDeadError()


@pytest.fixture
def engine(tiny_model_dir: Path) -> DyingEngine:
    return DyingEngine(load_tokenizer(tiny_model_dir))


@pytest.fixture
def client(engine: DyingEngine) -> Iterator[TestClient]:
    settings = parse_settings(["--model", "/models/fake", "--served-model-name", "fake"])
    with TestClient(build_app(settings, engine), raise_server_exceptions=False) as test_client:
        yield test_client


COMPLETION = {"model": "fake", "prompt": "hi", "max_tokens": 3}


def assert_engine_dead(reply: Any) -> None:
    assert reply.status_code == 503, reply.text
    assert reply.json()["error"]["code"] == "engine_dead"
    assert reply.json()["error"]["type"] == "service_unavailable"
    assert reply.headers["retry-after"] == str(ENGINE_DEAD_RETRY_AFTER_SECONDS)


def test_engine_dead_error_maps_to_503_engine_dead() -> None:
    err = as_openai_error(EngineDeadError())
    assert (err.status, err.code, err.headers) == (503, "engine_dead", {"Retry-After": "10"})
    assert as_openai_error(RuntimeError("boom")).status == 500


def test_probes_turn_503_once_the_engine_is_dead(client: TestClient, engine: DyingEngine) -> None:
    assert client.get("/ready").status_code == 200
    assert client.get("/health").status_code == 200
    engine.dead = True
    assert_engine_dead(client.get("/ready"))
    assert_engine_dead(client.get("/health"))
    assert client.get("/metrics").status_code == 200


def test_new_requests_are_refused_before_reaching_the_engine(client: TestClient, engine: DyingEngine) -> None:
    engine.dead = True
    client.get("/ready")  # the probe (or the watchdog) marks the engine dead
    before = engine.requests
    assert_engine_dead(client.post("/v1/completions", json=COMPLETION))
    assert_engine_dead(client.get("/v1/models"))
    assert engine.requests == before


def test_request_running_when_the_engine_dies_is_503(client: TestClient, engine: DyingEngine) -> None:
    engine.dead = True  # not yet noticed by any probe: the request reaches the engine and fails there
    assert_engine_dead(client.post("/v1/completions", json=COMPLETION))


def test_stream_in_flight_ends_with_an_engine_dead_frame_then_done(
    client: TestClient, engine: DyingEngine
) -> None:
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True}
    engine.die_after = 2
    reply = client.post("/v1/chat/completions", json=body)
    assert reply.status_code == 200
    frames = [line[6:] for line in reply.text.splitlines() if line.startswith("data: ")]
    assert frames[-1] == "[DONE]"
    assert json.loads(frames[-2])["error"]["code"] == "engine_dead"
    contents = [json.loads(f)["choices"][0]["delta"].get("content") for f in frames[:-2]]
    assert contents == ["", "x", "x"]


class _State:
    def __init__(self, engine: DyingEngine) -> None:
        self.engine = engine
        self.engine_dead = False
        self.draining = False
        self.in_flight = 0


@pytest.fixture
def watchdog(engine: DyingEngine, monkeypatch: pytest.MonkeyPatch) -> tuple[cli.DrainingServer, _State, list]:
    import uvicorn

    clock = [1000.0]
    monkeypatch.setattr(cli.time, "monotonic", lambda: clock[0])
    state = _State(engine)
    server = cli.DrainingServer(uvicorn.Config(app=None), state, drain_timeout=30)  # type: ignore[arg-type]
    return server, state, clock


@pytest.mark.anyio
async def test_watchdog_stops_the_server_after_the_minimum_linger(watchdog: Any, engine: DyingEngine) -> None:
    server, state, clock = watchdog
    assert not await server.on_tick(1) and not server.engine_died
    engine.dead = True
    assert not await server.on_tick(2)
    assert server.engine_died and state.engine_dead
    clock[0] += cli.ENGINE_DEAD_MIN_LINGER_SECONDS - 0.1
    assert not await server.on_tick(3), "exits before the minimum linger"
    clock[0] += 0.2
    assert await server.on_tick(4)
    assert not server.force_exit


@pytest.mark.anyio
async def test_watchdog_waits_for_streams_but_not_beyond_the_maximum(
    watchdog: Any, engine: DyingEngine
) -> None:
    server, state, clock = watchdog
    engine.dead = True
    state.in_flight = 1
    await server.on_tick(1)
    clock[0] += cli.ENGINE_DEAD_MIN_LINGER_SECONDS + 0.5
    assert not await server.on_tick(2), "a stream still in flight is given time to send its error frame"
    clock[0] += cli.ENGINE_DEAD_MAX_LINGER_SECONDS
    assert await server.on_tick(3)
    assert server.force_exit, "a stream stuck past the maximum is not waited for"
