"""End to end: when vLLM's engine core process dies (`kill -9` of `VLLM::EngineCore`), the server says so and
gets out of the way of its supervisor (issue 11):
- within 2 s `/ready` answers 503;
- a new request gets 503 `{"error": {"code": "engine_dead", ...}}` with `Retry-After`;
- a stream in flight ends with an error frame (code `engine_dead`), then `data: [DONE]`;
- the process exits non-zero within 10 s (docker compose's `restart:` policy or Kubernetes restarts it).

One server (tiny model); the engine core is found as the server's child process running vLLM's engine core.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from tests.support.server import REPO_ROOT, free_port, server_env, start_server

READY_WITHIN_S = 2.0
EXIT_WITHIN_S = 10.0


def engine_core(server_pid: int) -> psutil.Process:
    """The engine core process that vLLM's AsyncLLM started for the server `server_pid`."""
    for child in psutil.Process(server_pid).children(recursive=True):
        if "EngineCore" in child.name() or any("EngineCore" in part for part in child.cmdline()):
            return child
    raise AssertionError(f"no engine core process under {server_pid}")


def test_killing_the_engine_core_turns_ready_503_refuses_new_requests_and_exits(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    with start_server(tiny_model_dir, "--dtype", "float32", log_dir=tmp_path) as server:
        core = engine_core(server.process.pid)
        first_chunk = threading.Event()
        events: list[Any] = []

        def stream() -> None:
            body = {"model": tiny_model_dir.name, "prompt": "Once upon a time", "max_tokens": 900}
            with httpx.stream(
                "POST", f"{server.url}/v1/completions", json={**body, "stream": True}, timeout=60
            ) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        data = line[len("data: ") :]
                        events.append(data if data == "[DONE]" else json.loads(data))
                        first_chunk.set()

        streamer = threading.Thread(target=stream)
        streamer.start()
        assert first_chunk.wait(60), "the stream never started"
        core.send_signal(signal.SIGKILL)
        killed = time.monotonic()

        while httpx.get(f"{server.url}/ready", timeout=5).status_code != 503:
            assert time.monotonic() - killed < READY_WITHIN_S, "/ready still 200 after 2 s"
            time.sleep(0.05)
        ready_after = time.monotonic() - killed

        refused = httpx.post(
            f"{server.url}/v1/completions",
            json={"model": tiny_model_dir.name, "prompt": "hello", "max_tokens": 4},
            timeout=10,
        )
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "engine_dead"
        assert int(refused.headers["retry-after"]) > 0

        streamer.join(EXIT_WITHIN_S)
        assert not streamer.is_alive(), "the stream in flight did not end"
        assert events[-1] == "[DONE]", events[-3:]
        error = events[-2]
        assert isinstance(error, dict) and error["error"]["code"] == "engine_dead", events[-3:]
        assert not any(
            isinstance(e, dict) and (e.get("choices") or [{}])[0].get("finish_reason") for e in events[:-2]
        ), "the stream finished before the engine was killed: nothing was in flight"

        code = server.process.wait(max(EXIT_WITHIN_S - (time.monotonic() - killed), 0.1))
        exited_after = time.monotonic() - killed
        assert code != 0
        print(f"/ready 503 after {ready_after:.2f} s, exit {code} after {exited_after:.2f} s")
        assert "the engine died" in server.log()


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
