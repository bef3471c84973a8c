"""End to end: vLLM's engine core process dies or hangs and the server replaces it in place (issue 33).

One server (tiny model, LoRA on, `--engine-hang-timeout-seconds 4`, `--engine-restart-max 3`, a fault file
that the test-only plugin `serve.vllm_plugin.faults` reads), used by the tests below in file order:
1. `kill -9` of the engine core with a stream in flight and an adapter loaded at run time: /ready turns 503
   within 2 s; the stream ends with an `engine_dead` error frame, then `[DONE]`; a new request gets 503
   `engine_restarting` with Retry-After; the next successful request comes within the start-up time + 10 s
   from the same API process, and the adapter still answers under its name (as it did before);
2. SIGSTOP of the engine core with a stream in flight: the watchdog sees no output while busy, kills it and
   replaces it within the hang timeout (+ slack); the stream ends with its error frame;
3. a crash loop: every engine core started from now on exits at once (the fault file exists); after the
   death and its failed restart (4 failures > 3; several failed starts: the unit tests), the process exits
   non-zero with one line saying why.
A server stopped while its engine loads leaves no engine process behind (a server of its own).
Data parallel (DP = 2, opt-in `--run-slow`): one rank killed -> vLLM's DP client declares the whole engine
dead (it cannot replace one rank), so the whole engine (both ranks) is replaced, and it serves again.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.e2e.serve_helpers import metric
from tests.support.lora import build_lora_adapter
from tests.support.server import REPO_ROOT, RunningServer, free_port, server_env, start_server

READY_WITHIN_S = 2.0
HANG_TIMEOUT_S = 4.0
RESTART_MAX = 3  # the kill, the hang and the crash-loop death leave room for one failed start
FAULT_ENV = "LLMSTACK_FAULT_ENGINE_CORE_EXIT_FILE"


def engine_cores(server_pid: int) -> list[psutil.Process]:
    """The engine core processes that vLLM's AsyncLLM started for the server `server_pid`."""
    return [
        child
        for child in psutil.Process(server_pid).children(recursive=True)
        if "EngineCore" in child.name() or any("EngineCore" in part for part in child.cmdline())
    ]


def engine_core(server_pid: int) -> psutil.Process:
    cores = engine_cores(server_pid)
    assert cores, f"no engine core process under {server_pid}"
    return cores[0]


@dataclass
class Healing:
    server: RunningServer
    startup_s: float
    fault_file: Path
    model: str


@pytest.fixture(scope="module")
def healing(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Healing]:
    folder = tmp_path_factory.mktemp("healing")
    fault_file = folder / "engine-core-exits"
    args = ["--dtype", "float32", "--enable-lora", "--max-lora-rank", "8", "--served-model-name", "tiny"]
    args += ["--engine-hang-timeout-seconds", str(HANG_TIMEOUT_S), "--engine-restart-max", str(RESTART_MAX)]
    args += ["--engine-restart-window-seconds", "3600", "--engine-restart-backoff-seconds", "0.5"]
    started = time.monotonic()
    with start_server(tiny_model_dir, *args, env={FAULT_ENV: str(fault_file)}, log_dir=folder) as server:
        yield Healing(server, time.monotonic() - started, fault_file, "tiny")


def complete(url: str, model: str, prompt: str = "hello", max_tokens: int = 6) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60)


class Stream(threading.Thread):
    """A long streamed completion; `events` gets its data frames (JSON, or the `[DONE]` string)."""

    def __init__(self, url: str, model: str) -> None:
        super().__init__(daemon=True)
        self.url, self.model = url, model
        self.first = threading.Event()
        self.events: list[Any] = []

    def run(self) -> None:
        body = {"model": self.model, "prompt": "Once upon a time", "max_tokens": 900, "stream": True}
        body["ignore_eos"] = True
        with httpx.stream("POST", f"{self.url}/v1/completions", json=body, timeout=120) as reply:
            assert reply.status_code == 200
            for line in reply.iter_lines():
                if line.startswith("data: "):
                    data = line[len("data: ") :]
                    self.events.append(data if data == "[DONE]" else json.loads(data))
                    self.first.set()

    def assert_ended_with_engine_dead(self, within: float) -> None:
        self.join(within)
        assert not self.is_alive(), "the stream in flight did not end"
        assert self.events[-1] == "[DONE]", self.events[-3:]
        error = self.events[-2]
        assert isinstance(error, dict) and error["error"]["code"] == "engine_dead", self.events[-3:]
        assert not any(
            isinstance(e, dict) and (e.get("choices") or [{}])[0].get("finish_reason")
            for e in self.events[:-2]
        ), "the stream finished before the engine went: nothing was in flight"


def start_stream(url: str, model: str) -> Stream:
    stream = Stream(url, model)
    stream.start()
    assert stream.first.wait(60), "the stream never started"
    return stream


def wait_for(check: Callable[[], bool], within: float, what: str) -> float:
    """Seconds until `check()` holds (polled), failing after `within`."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < within, f"{what}: not within {within:.0f} s"
        time.sleep(0.05)
    return time.monotonic() - start


def first_success(url: str, model: str, within: float) -> float:
    """Seconds until a completion succeeds (a 503 while the engine restarts is retried)."""
    start = time.monotonic()
    while True:
        reply = complete(url, model)
        if reply.status_code == 200:
            return time.monotonic() - start
        assert reply.status_code == 503, reply.text
        assert reply.json()["error"]["code"] in ("engine_restarting", "engine_dead"), reply.text
        assert time.monotonic() - start < within, f"no successful request within {within:.0f} s"
        time.sleep(0.1)


def ready_code(url: str) -> int:
    return httpx.get(f"{url}/ready", timeout=5).status_code


def test_kill_9_of_the_engine_core_is_healed_in_place_with_run_time_adapters(
    healing: Healing, tiny_model_dir: Path, tmp_path: Path
) -> None:
    server, url = healing.server, healing.server.url
    adapter = build_lora_adapter(tiny_model_dir, tmp_path / "healer", seed=3, rank=8)
    loaded = httpx.post(f"{url}/v1/adapters", json={"name": "healer", "path": str(adapter)}, timeout=60)
    assert loaded.status_code == 200, loaded.text
    before = complete(url, "healer", "The answer is", 8)
    assert before.status_code == 200, before.text
    api_pid, core = server.process.pid, engine_core(server.process.pid)

    stream = start_stream(url, healing.model)
    core.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    wait_for(lambda: ready_code(url) == 503, READY_WITHIN_S, "/ready 503 after the kill")
    refused = complete(url, healing.model)
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "engine_restarting"
    assert int(refused.headers["retry-after"]) > 0
    health = httpx.get(f"{url}/health", timeout=5)
    assert health.status_code == 200 and health.json()["engine"]["state"] == "restarting"
    stream.assert_ended_with_engine_dead(30)

    budget = healing.startup_s + 10
    first_success(url, healing.model, budget - (time.monotonic() - killed))
    healed_after = time.monotonic() - killed
    print(f"kill -9 -> first success after {healed_after:.1f} s (server start-up {healing.startup_s:.1f} s)")
    assert server.process.poll() is None and server.process.pid == api_pid, "the API process restarted"
    assert engine_core(api_pid).pid != core.pid
    after = complete(url, "healer", "The answer is", 8)
    assert after.status_code == 200, after.text
    assert after.json()["choices"][0]["text"] == before.json()["choices"][0]["text"]
    assert ready_code(url) == 200
    assert httpx.get(f"{url}/health", timeout=5).json()["engine"]["restarts"] == 1
    assert metric(url, "llmstack:engine_restarts_total", reason="died") == 1
    assert "killed by SIGKILL" in server.log()


def test_a_stopped_engine_core_with_work_is_detected_and_replaced(healing: Healing) -> None:
    server, url = healing.server, healing.server.url
    core = engine_core(server.process.pid)
    stream = start_stream(url, healing.model)
    core.send_signal(signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        detected = wait_for(lambda: ready_code(url) == 503, HANG_TIMEOUT_S + 5, "the hang detected")
        stream.assert_ended_with_engine_dead(30)
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            core.send_signal(signal.SIGCONT)
    assert detected >= HANG_TIMEOUT_S - 1.0, "a hang was declared before the timeout"
    first_success(url, healing.model, healing.startup_s + 10)
    print(f"SIGSTOP -> detected after {detected:.1f} s, serving after {time.monotonic() - stopped:.1f} s")
    assert not core.is_running() or core.status() == psutil.STATUS_ZOMBIE, (
        "the hung engine core was not killed"
    )
    assert metric(url, "llmstack:engine_restarts_total", reason="hung") == 1
    assert (
        "hung (no output for" in server.log() and f"SIGKILL sent to EngineCore pid {core.pid}" in server.log()
    )


def test_a_crash_loop_exits_non_zero_with_one_line(healing: Healing) -> None:
    server = healing.server
    healing.fault_file.touch()  # from now on every engine core exits as it starts
    engine_core(server.process.pid).send_signal(signal.SIGKILL)
    code = server.process.wait(180)
    assert code == 1
    log = server.log()
    errors = [line for line in log.splitlines() if line.startswith("serve: error:")]
    assert len(errors) == 1, errors
    last = errors[0]
    assert last.startswith("serve: error: the engine died for good ("), last
    assert f"{RESTART_MAX + 1} engine failures" in last, last
    assert "injected fault" in log


def test_sigterm_while_the_engine_loads_leaves_no_engine_process(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A server stopped before it is ready (a supervisor's stop, a failed rollout) takes its engine core
    with it: Python's default SIGTERM action used to end the API process at once and leave the engine core
    running, orphaned."""
    env = server_env({"VLLM_ENABLE_V1_MULTIPROCESSING": "1"})  # as `serve` runs: a separate engine process
    command = [sys.executable, "-m", "serve.cli", "--model", str(tiny_model_dir), "--dtype", "float32"]
    command += ["--host", "127.0.0.1", "--port", str(free_port())]
    with (tmp_path / "serve.log").open("wb") as log:
        server = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    children: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 180
        while True:  # until the engine core process exists (the server is loading the model)
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "no engine core process appeared"
            children = psutil.Process(server.pid).children(recursive=True)
            if any("EngineCore" in c.name() for c in children):
                break
            time.sleep(0.2)
        server.send_signal(signal.SIGTERM)
        code = server.wait(60)
        assert code != 0  # it did not serve
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, [(p.pid, p.name()) for p in alive]
    finally:
        if server.poll() is None:
            server.kill()
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()


@pytest.mark.slow
def test_one_data_parallel_rank_killed_replaces_the_whole_engine(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    args = ["--dtype", "float32", "--served-model-name", "tiny", "--data-parallel-size", "2"]
    started = time.monotonic()
    with start_server(tiny_model_dir, *args, env=env, log_dir=tmp_path, startup_timeout=400) as server:
        startup = time.monotonic() - started
        cores = engine_cores(server.process.pid)
        assert len(cores) == 2, [c.name() for c in cores]
        assert complete(server.url, "tiny").status_code == 200
        cores[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: ready_code(server.url) == 503, READY_WITHIN_S, "/ready 503 after the kill")
        first_success(server.url, "tiny", startup + 10)
        print(f"DP=2, rank 1 killed -> first successful request {time.monotonic() - killed:.1f} s")
        new_cores = engine_cores(server.process.pid)
        assert len(new_cores) == 2 and not {c.pid for c in new_cores} & {c.pid for c in cores}, (
            "vLLM's DP client cannot replace one rank: both ranks are new"
        )
        assert cores[0].is_running() is False or cores[0].status() == psutil.STATUS_ZOMBIE
