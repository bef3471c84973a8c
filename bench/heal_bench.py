"""Recovery time after an engine death: the engine replaced in place vs a full process restart. Prints
figures; asserts nothing.

Each round measures, from the moment of the kill to the first successful completion:
- `in place`: `kill -9` of the engine core of a running `serve`; the API process stays and replaces the
  engine (serve.engine.supervisor); the completion is retried every 0.1 s while it answers 503;
- `process`: what a supervisor does without it: `kill -9` of the whole server (API process and engine core),
  then a new `serve` process is started at once and polled the same way (connection refused is retried).
The two alternate in order from round to round; medians with min..max.

Usage: python -m bench.heal_bench [--model tiny|smollm2|PATH] [--rounds 3] [--dtype float32]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import psutil

from bench.compare_vllm import contender_env, free_port, resolve_model, stop

REPO_ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 600.0


class Server:
    """One `serve` process on a fixed port (so that a restarted one answers at the same address)."""

    def __init__(self, model: Path, dtype: str, port: int, log_dir: Path) -> None:
        self.model, self.dtype, self.port, self.log_dir = model, dtype, port, log_dir
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [sys.executable, "-m", "serve.cli", "--model", str(self.model), "--served-model-name", "m"]
        command += ["--host", "127.0.0.1", "--port", str(self.port), "--dtype", self.dtype]
        with (self.log_dir / f"serve-{time.time_ns()}.log").open("wb") as log:
            self.proc = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=contender_env(), cwd=REPO_ROOT
            )

    def engine_core(self) -> psutil.Process:
        assert self.proc is not None
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            if "EngineCore" in child.name():
                return child
        raise RuntimeError("no engine core process")

    def kill_all(self) -> None:
        """kill -9 of the API process and its engine core (a crash of the whole server)."""
        assert self.proc is not None
        children = psutil.Process(self.proc.pid).children(recursive=True)
        self.proc.kill()
        for child in children:
            child.kill()
        self.proc.wait()
        psutil.wait_procs(children, timeout=30)


def first_success(url: str, start: float) -> float:
    """Seconds from `start` until a completion succeeds."""
    body = {"model": "m", "prompt": "hello", "max_tokens": 4}
    while time.monotonic() - start < TIMEOUT_S:
        try:
            if httpx.post(f"{url}/v1/completions", json=body, timeout=30).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"no successful request within {TIMEOUT_S:.0f} s")


def in_place(server: Server) -> float:
    server.engine_core().send_signal(signal.SIGKILL)
    return first_success(server.url, time.monotonic())


def process_restart(server: Server) -> float:
    start = time.monotonic()
    server.kill_all()
    server.start()
    return first_success(server.url, start)


def spread(values: Sequence[float]) -> str:
    return f"{statistics.median(values):.1f} s ({min(values):.1f}..{max(values):.1f})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)
    model = resolve_model(args.model)
    results: dict[str, list[float]] = {"in place": [], "process": []}
    with tempfile.TemporaryDirectory(prefix="heal-bench-") as folder:
        server = Server(model, args.dtype, free_port(), Path(folder))
        server.start()
        try:
            first_success(server.url, time.monotonic())
            for round_ in range(args.rounds):
                order = ("in place", "process") if round_ % 2 == 0 else ("process", "in place")
                for kind in order:
                    seconds = in_place(server) if kind == "in place" else process_restart(server)
                    results[kind].append(seconds)
                    print(f"round {round_ + 1}: {kind:8s} kill -> first success {seconds:.1f} s", flush=True)
        finally:
            if server.proc is not None:
                stop(server.proc)
    print(f"load average at the end {os.getloadavg()[0]:.1f}; {args.rounds} rounds, median (min..max)")
    for kind, values in results.items():
        print(f"{kind:8s}: {spread(values)}")
    ratios = [a / b for a, b in zip(results["in place"], results["process"], strict=True)]
    print(
        f"in place / process, paired per round: {statistics.median(ratios):.2f} "
        f"({min(ratios):.2f}..{max(ratios):.2f})"
    )


if __name__ == "__main__":
    main()
