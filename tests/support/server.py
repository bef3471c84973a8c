"""Start `serve` as a subprocess for end-to-end tests.

Usage (stable interface; other packages' e2e tests rely on it)::

    from tests.support.server import start_server

    with start_server(tiny_model_dir, "--max-loras", "2", log_dir=tmp_path) as server:
        client = openai.OpenAI(base_url=server.openai_url, api_key="unused")
        ...
        httpx.get(f"{server.url}/metrics")

    # module-scoped fixture:
    @pytest.fixture(scope="module")
    def server(tiny_model_dir, tmp_path_factory):
        with start_server(tiny_model_dir, log_dir=tmp_path_factory.mktemp("serve")) as running:
            yield running

`start_server(model, *args, env=None, log_dir=None, startup_timeout=240.0, stop_timeout=60.0)`:
- runs `python -m serve.cli --model MODEL --host 127.0.0.1 --port <free port> *ARGS` (this interpreter);
- `env` entries are added to (and override) the inherited environment; defaults set when absent:
  `VLLM_ENABLE_V1_MULTIPROCESSING=0`, `VLLM_CPU_KVCACHE_SPACE=1`, `VLLM_HOST_IP=127.0.0.1`,
  `VLLM_NO_USAGE_STATS=1`, `HF_HUB_OFFLINE=1` (in vLLM 0.32 the multiprocessing switch only affects `LLM`:
  `AsyncLLM` always runs its engine core in a child process, which the AMX plugin covers);
- waits until `GET /ready` answers 200 (raises `ServerError` with the log's tail if the process exits or the
  timeout passes);
- yields a `RunningServer`: `url` (base URL, e.g. http://127.0.0.1:41234), `openai_url` (`url + "/v1"`),
  `process` (the `subprocess.Popen`), `log_path`, `log()` (the log text so far), and `stop()` (SIGTERM, wait,
  return the exit code);
- on exit sends SIGTERM (if still running) and waits up to `stop_timeout` s, then SIGKILL.
The log file is `<log_dir>/serve-<port>.log`; `log_dir` defaults to a fresh temporary folder outside the repo.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

from serve.engine import cpu_env

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    **cpu_env.CPU_ENV_DEFAULTS,
    **cpu_env.OFFLINE_ENV_DEFAULTS,
}


class ServerError(RuntimeError):
    """The server did not start (the message ends with the tail of its log)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RunningServer:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def openai_url(self) -> str:
        return self.url + "/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, then wait (SIGKILL after `timeout` s); the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def server_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a server process the tests start: this one's, DEFAULT_ENV where it sets nothing,
    then `extra`."""
    return {**os.environ, **{k: v for k, v in DEFAULT_ENV.items() if k not in os.environ}, **(extra or {})}


@contextlib.contextmanager
def start_server(
    model: str | os.PathLike[str],
    *args: str,
    env: Mapping[str, str] | None = None,
    log_dir: str | os.PathLike[str] | None = None,
    startup_timeout: float = 240.0,
    stop_timeout: float = 60.0,
) -> Iterator[RunningServer]:
    port = free_port()
    folder = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="serve-log-"))
    folder.mkdir(parents=True, exist_ok=True)
    log_path = folder / f"serve-{port}.log"
    full_env = server_env(env)
    if env is None or "VLLM_ENABLE_V1_MULTIPROCESSING" not in env:
        full_env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    command = [sys.executable, "-m", "serve.cli", "--model", str(model), "--host", "127.0.0.1"]
    command += ["--port", str(port), *args]
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=full_env, stdout=log_file, stderr=subprocess.STDOUT
        )
    server = RunningServer(f"http://127.0.0.1:{port}", process, log_path)
    try:
        _wait_ready(server, startup_timeout)
        yield server
    finally:
        server.stop(stop_timeout)


def _wait_ready(server: RunningServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise ServerError(f"serve exited with {server.process.returncode}:\n{server.log()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{server.url}/ready", timeout=2).status_code == 200:
                return
        time.sleep(0.25)
    raise ServerError(f"serve was not ready after {timeout:.0f} s:\n{server.log()[-3000:]}")
