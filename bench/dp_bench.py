"""Throughput of `serve` with data parallel 2 vs 1 engine on the same cores. Prints figures; asserts nothing.

Each round starts `serve` once per layout (one at a time; the order alternates from round to round) and runs
the same closed-loop load (bench.serve_bench: streamed completions, `ignore_eos`, so every request produces
exactly `--max-tokens` tokens):
- `dp1`: one engine rank with every core (`VLLM_CPU_OMP_THREADS_BIND` = all of them);
- `dp2`: `--data-parallel-size 2`, one core per rank (`VLLM_CPU_OMP_THREADS_BIND=0|1`), vLLM's least-load
  balancer in front.
Per run: output tokens/s and the CPU seconds of the whole server tree (API process + every engine process)
per 1,000 output tokens. The ratios dp2/dp1 are paired within a round; medians with min..max.

Usage: python -m bench.dp_bench [--model tiny|smollm2|PATH] [--rounds 3] [--concurrency 16]
       [--num-requests 128] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import psutil

from bench.compare_vllm import contender_env, free_port, resolve_model, stop
from bench.cpu_kinds import tree_cpu_seconds
from bench.prompts import build_prompts
from bench.serve_bench import LoadConfig, run_levels, wait_ready

REPO_ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = ("dp1", "dp2")


def layout_env(layout: str) -> dict[str, str]:
    env = contender_env()
    cores = sorted(os.sched_getaffinity(0))
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    if layout == "dp1":
        env["VLLM_CPU_OMP_THREADS_BIND"] = f"{cores[0]}-{cores[-1]}"
    else:
        env["VLLM_CPU_OMP_THREADS_BIND"] = f"{cores[0]}|{cores[-1]}"
    return env


def run(layout: str, model: Path, args: argparse.Namespace, log_dir: Path) -> tuple[float, float, int]:
    """(output tok/s, server CPU s per 1k output tokens, errors) of one run."""
    port = free_port()
    command = [sys.executable, "-m", "serve.cli", "--model", str(model), "--served-model-name", "m"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--dtype", args.dtype]
    if layout == "dp2":
        command += ["--data-parallel-size", "2"]
    log_path = log_dir / f"{layout}-{port}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=layout_env(layout), cwd=REPO_ROOT
        )
    try:
        base_url = f"http://127.0.0.1:{port}/v1"
        asyncio.run(wait_ready(base_url, timeout_s=args.start_timeout))
        server = psutil.Process(proc.pid)
        cfg = LoadConfig(
            base_url=base_url,
            model="m",
            endpoint="completions",
            max_tokens=args.max_tokens,
            ignore_eos=True,
        )
        prompts = build_prompts(256, seed=0)
        before = tree_cpu_seconds(server)
        (summary,) = asyncio.run(run_levels(cfg, prompts, [args.concurrency], args.num_requests))
        cpu = tree_cpu_seconds(server) - before
        tokens = max(summary.total_output_tokens, 1)
        return summary.output_throughput, 1e3 * cpu / tokens, summary.errors
    finally:
        stop(proc)


def spread(values: Sequence[float]) -> str:
    return f"{statistics.median(values):.3g} ({min(values):.3g}..{max(values):.3g})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny | smollm2 | a model folder")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--num-requests", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--start-timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    model = resolve_model(args.model)
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(f"model {model.name} ({args.dtype}), {os.cpu_count()} cores, load average {load}", flush=True)
    rows: dict[str, list[tuple[float, float, int]]] = {layout: [] for layout in LAYOUTS}
    with tempfile.TemporaryDirectory(prefix="dp-bench-") as log_dir:
        for r in range(args.rounds):
            for layout in LAYOUTS if r % 2 == 0 else LAYOUTS[::-1]:
                rows[layout].append(run(layout, model, args, Path(log_dir)))
                tok_s, cpu, errors = rows[layout][-1]
                print(f"round {r + 1} {layout}: {tok_s:.1f} tok/s, {cpu:.2f} CPU-s/1k tok, errors {errors}")
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(f"load average at the end {load}; {args.rounds} rounds, median (min..max)")
    for layout in LAYOUTS:
        runs = rows[layout]
        tok_s, cpu = spread([t for t, _, _ in runs]), spread([c for _, c, _ in runs])
        print(f"{layout}: tok/s {tok_s}, CPU-s/1k tok {cpu}, errors {sum(e for _, _, e in runs)}")
    pairs = list(zip(rows["dp2"], rows["dp1"], strict=True))
    print(f"dp2/dp1 tok/s {spread([a[0] / b[0] for a, b in pairs])}")
    print(f"dp2/dp1 CPU per token {spread([a[1] / b[1] for a, b in pairs])}")


if __name__ == "__main__":
    main()
