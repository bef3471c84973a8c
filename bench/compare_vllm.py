"""A/B benchmark: this project's `serve` against vLLM's own OpenAI server and the engine-direct ceiling.

Each round starts every contender in turn on this machine (one at a time), runs the same load (`serve_bench`:
same seeded prompts, same concurrency levels) against it, and stops it; the order rotates from round to round
so drift on a noisy machine hits every contender alike. Every contender gets the same model, the same engine
settings (dtype, max_model_len, enforce_eager, max_num_seqs, max_num_batched_tokens) and the same vLLM
environment (VLLM_CPU_KVCACHE_SPACE ...). Ratios are taken within a round (paired); medians over rounds are
printed.

- vllm:   `python -m vllm.entrypoints.openai.api_server` (the `vllm serve` console script fails here)
- ours:   `python -m serve.cli` (this project's `serve`)
- engine: `python -m bench.engine_direct` (AsyncLLM in-process, no HTTP)

Usage: python -m bench.compare_vllm --model tiny|smollm2|PATH --rounds 3 --concurrency 1 8 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

from bench.engine_direct import add_engine_arguments
from bench.prompts import build_prompts, prompts_digest
from bench.serve_bench import (
    Summary,
    add_load_arguments,
    format_table,
    load_config,
    run_levels,
    wait_ready,
)
from serve.engine import cpu_env

REPO_ROOT = Path(__file__).resolve().parent.parent
CONTENDERS = ("ours", "vllm", "engine")


def resolve_model(spec: str) -> Path:
    """`tiny` (the tests' random tiny Llama), `smollm2` (the default model) or a folder."""
    if spec == "tiny":
        from tests.support.tiny_model import tiny_model

        return tiny_model(REPO_ROOT / ".cache" / "test-assets", seed=0)
    if spec == "smollm2":
        from core.default_model import ensure_default_model

        return ensure_default_model()
    path = Path(spec)
    if not path.is_dir():
        raise SystemExit(f"--model: {spec} is not a folder (nor 'tiny' or 'smollm2')")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def engine_flags(args: argparse.Namespace) -> list[str]:
    """vLLM engine flags given to vLLM's server and the engine-direct run (ours has the same defaults)."""
    return [
        "--dtype",
        args.dtype,
        "--max-model-len",
        str(args.max_model_len),
        "--max-num-seqs",
        str(args.max_num_seqs),
        "--max-num-batched-tokens",
        str(args.max_num_batched_tokens),
    ]


def server_command(name: str, model: Path, served: str, port: int, args: argparse.Namespace) -> list[str]:
    common = [
        "--model",
        str(model),
        "--served-model-name",
        served,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    if name == "vllm":
        return [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            *common,
            "--enforce-eager",
            *engine_flags(args),
        ]
    # `serve` exposes dtype and max_model_len; vLLM's CPU defaults give it max_num_seqs 128 and
    # max_num_batched_tokens 2048 (the values passed to the others; see docs/BENCHMARKS.md).
    return [
        sys.executable,
        "-m",
        "serve.cli",
        *common,
        "--dtype",
        args.dtype,
        "--max-model-len",
        str(args.max_model_len),
        "--max-concurrent-requests",
        str(max(64, max(args.concurrency))),
    ]


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` alone (its children, e.g. vLLM's engine core, excluded)."""
    fields_after_name = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime = int(fields_after_name[11]), int(fields_after_name[12])
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def contender_env() -> dict[str, str]:
    env = dict(os.environ)
    cpu_env.apply_defaults(env)
    return env


def stop(proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    """SIGTERM (both servers drain and exit), SIGKILL after `timeout`."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def started_server(
    name: str, model: Path, args: argparse.Namespace, log_dir: Path
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """Start one server (`name`: ours or vllm), wait until it answers, yield (process, base URL), stop it."""
    port = free_port()
    log_path = log_dir / f"{name}-{port}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            server_command(name, model, args.served_model_name, port, args),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=contender_env(),
            cwd=REPO_ROOT,
        )
        try:
            base_url = f"http://127.0.0.1:{port}/v1"
            started = time.monotonic()
            asyncio.run(wait_ready(base_url, timeout_s=args.start_timeout))
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; log: {log_path}")
            print(f"  {name}: ready in {time.monotonic() - started:.1f} s (log {log_path})", flush=True)
            yield proc, base_url
        finally:
            stop(proc)


def run_server(name: str, model: Path, args: argparse.Namespace, log_dir: Path) -> list[Summary]:
    """Start one server, load it at every level, stop it."""
    with started_server(name, model, args, log_dir) as (proc, base_url):
        prompts = build_prompts(args.num_prompts, seed=args.seed)
        base = load_config(args, base_url, args.served_model_name, None)
        return asyncio.run(
            run_levels(
                base,
                prompts,
                args.concurrency,
                args.num_requests,
                args.warmup,
                cpu_seconds=lambda: process_cpu_seconds(proc.pid),
            )
        )


def run_engine(model: Path, args: argparse.Namespace, log_dir: Path) -> list[Summary]:
    """The engine-direct ceiling, in its own process."""
    cmd = [
        sys.executable,
        "-m",
        "bench.engine_direct",
        "--model",
        str(model),
        "--served-model-name",
        args.served_model_name,
        "--json",
        *engine_flags(args),
        "--endpoint",
        args.endpoint,
        "--concurrency",
        *map(str, args.concurrency),
        "--max-tokens",
        str(args.max_tokens),
        "--temperature",
        str(args.temperature),
        "--num-prompts",
        str(args.num_prompts),
        "--seed",
        str(args.seed),
        "--warmup",
        str(args.warmup),
    ]
    if args.num_requests:
        cmd += ["--num-requests", str(args.num_requests)]
    if args.ignore_eos:
        cmd.append("--ignore-eos")
    log_path = log_dir / f"engine-{time.monotonic_ns()}.log"
    proc = subprocess.run(cmd, capture_output=True, env=contender_env(), cwd=REPO_ROOT, check=False)
    log_path.write_bytes(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"engine_direct failed ({proc.returncode}); log: {log_path}")
    return [
        Summary(**json.loads(line[5:]))
        for line in proc.stdout.decode().splitlines()
        if line.startswith("JSON ")
    ]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


MEDIAN_FIELDS = tuple(
    f.name for f in fields(Summary) if f.type in ("float", float) and f.name not in ("request_rate",)
)


def median_summary(per_round: Sequence[Summary]) -> Summary:
    """One level's summary with every float figure replaced by its median over rounds; errors summed."""
    medians: dict[str, Any] = {name: median([getattr(s, name) for s in per_round]) for name in MEDIAN_FIELDS}
    medians.update(errors=sum(s.errors for s in per_round), error_samples=[])
    return replace(per_round[0], **medians)


def report(results: dict[str, list[list[Summary]]], concurrencies: Sequence[int]) -> str:
    """Medians over rounds per contender and level, and the paired ratios ours/vllm and ours/engine."""
    lines = []
    for name, rounds in results.items():
        if not rounds:
            continue
        lines.append(f"\n{name}: medians over {len(rounds)} rounds (times in ms)")
        medians = []
        for i in range(len(concurrencies)):
            medians.append(median_summary([r[i] for r in rounds]))
        lines.append(format_table(medians))
    lines.append("\nAPI-process CPU ms per request, ours/vllm (median over rounds [min..max]):")
    for i, conc in enumerate(concurrencies):
        cpu = [
            o[i].api_cpu_ms_per_request / v[i].api_cpu_ms_per_request
            for o, v in zip(results.get("ours", []), results.get("vllm", []), strict=False)
        ]
        ours_ms = median([o[i].api_cpu_ms_per_request for o in results.get("ours", [])])
        vllm_ms = median([v[i].api_cpu_ms_per_request for v in results.get("vllm", [])])
        span = f"[{min(cpu, default=float('nan')):.3f}..{max(cpu, default=float('nan')):.3f}]"
        lines.append(
            f"{conc:>5d}  ours {ours_ms:6.2f} ms  vllm {vllm_ms:6.2f} ms  ratio {median(cpu):.3f} {span}"
        )
    lines.append("\npaired ratios (median over rounds; each round's contenders ran back to back):")
    lines.append(
        " conc  tok/s ours/vllm [min..max]   TTFT p50 ours-vllm ms [min..max]   ITL p50 ours-vllm ms"
        "   tok/s ours/engine  tok/s vllm/engine"
    )
    ours, theirs, engine = results.get("ours", []), results.get("vllm", []), results.get("engine", [])
    for i, conc in enumerate(concurrencies):
        tput = [o[i].output_throughput / v[i].output_throughput for o, v in zip(ours, theirs, strict=False)]
        ttft = [o[i].ttft_p50_ms - v[i].ttft_p50_ms for o, v in zip(ours, theirs, strict=False)]
        itl = [o[i].itl_p50_ms - v[i].itl_p50_ms for o, v in zip(ours, theirs, strict=False)]
        o_e = [o[i].output_throughput / e[i].output_throughput for o, e in zip(ours, engine, strict=False)]
        v_e = [v[i].output_throughput / e[i].output_throughput for v, e in zip(theirs, engine, strict=False)]
        span = f"[{min(tput, default=float('nan')):.3f}..{max(tput, default=float('nan')):.3f}]"
        tspan = f"[{min(ttft, default=float('nan')):+.1f}..{max(ttft, default=float('nan')):+.1f}]"
        lines.append(
            f"{conc:>5d}  {median(tput):>14.3f} {span:<16}  {median(ttft):>+13.2f} {tspan:<18}"
            f"  {median(itl):>+19.2f}  {median(o_e):>17.3f}  {median(v_e):>17.3f}"
        )
    return "\n".join(lines)


def markdown(results: dict[str, list[list[Summary]]], concurrencies: Sequence[int]) -> str:
    """Markdown tables of the medians over rounds and of the paired ratios (for docs/BENCHMARKS.md)."""
    rows = [
        "| contender | conc | req/s | out tok/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | ITL p50 ms "
        "| ITL p99 ms | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, rounds in results.items():
        for i in range(len(concurrencies)):
            m = median_summary([r[i] for r in rounds])
            rows.append(
                f"| {name} | {m.concurrency} | {m.request_throughput:.2f} | {m.output_throughput:.0f} "
                f"| {m.ttft_p50_ms:.1f} | {m.ttft_p99_ms:.1f} | {m.tpot_p50_ms:.2f} | {m.itl_p50_ms:.2f} "
                f"| {m.itl_p99_ms:.2f} | {m.errors} |"
            )
    rows += [
        "",
        "| conc | tok/s ours/vllm (median, min..max) | TTFT p50 ours−vllm ms (median, min..max) "
        "| API CPU ms/request ours, vllm | API CPU ours/vllm (median, min..max) "
        "| tok/s ours/engine | tok/s vllm/engine |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ours, theirs, engine = results.get("ours", []), results.get("vllm", []), results.get("engine", [])
    for i, conc in enumerate(concurrencies):
        tput = [o[i].output_throughput / v[i].output_throughput for o, v in zip(ours, theirs, strict=False)]
        ttft = [o[i].ttft_p50_ms - v[i].ttft_p50_ms for o, v in zip(ours, theirs, strict=False)]
        o_e = [o[i].output_throughput / e[i].output_throughput for o, e in zip(ours, engine, strict=False)]
        v_e = [v[i].output_throughput / e[i].output_throughput for v, e in zip(theirs, engine, strict=False)]
        if not tput:
            continue
        cpu = [
            o[i].api_cpu_ms_per_request / v[i].api_cpu_ms_per_request
            for o, v in zip(ours, theirs, strict=False)
        ]
        cpu_ms = (
            median([o[i].api_cpu_ms_per_request for o in ours]),
            median([v[i].api_cpu_ms_per_request for v in theirs]),
        )
        rows.append(
            f"| {conc} | {median(tput):.3f} ({min(tput):.3f}..{max(tput):.3f}) "
            f"| {median(ttft):+.1f} ({min(ttft):+.1f}..{max(ttft):+.1f}) "
            f"| {cpu_ms[0]:.2f}, {cpu_ms[1]:.2f} | {median(cpu):.3f} ({min(cpu):.3f}..{max(cpu):.3f}) "
            f"| {median(o_e):.3f} | {median(v_e):.3f} |"
        )
    return "\n".join(rows)


def load_results(path: Path) -> dict[str, list[list[Summary]]]:
    """The per-round summaries written by `--json-out`."""
    raw = json.loads(path.read_text())
    return {name: [[Summary(**s) for s in r] for r in rounds] for name, rounds in raw.items()}


def round_order(contenders: Sequence[str], round_no: int) -> list[str]:
    """The contenders in round `round_no`'s order: rotated by one each round, so drift hits all alike."""
    shift = round_no % len(contenders)
    return [*contenders[shift:], *contenders[:shift]]


def add_contender_arguments(parser: argparse.ArgumentParser, contenders: Sequence[str]) -> None:
    """The options every A/B benchmark of servers shares: model, served name, rounds, contenders, start-up."""
    parser.add_argument("--model", default="tiny", help="tiny | smollm2 | a model folder")
    parser.add_argument("--served-model-name", default="bench-model")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--contenders", nargs="+", choices=contenders, default=list(contenders))
    parser.add_argument("--start-timeout", type=float, default=300.0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_contender_arguments(parser, CONTENDERS)
    parser.add_argument("--json-out", type=Path, default=None, help="write every round's summaries here")
    parser.add_argument("--report-from", type=Path, default=None, help="re-print a --json-out file's report")
    add_engine_arguments(parser)
    add_load_arguments(parser)
    args = parser.parse_args(argv)
    if args.report_from:
        saved = load_results(args.report_from)
        levels = [s.concurrency for s in next(iter(saved.values()))[0]]
        print(report(saved, levels))
        print(markdown(saved, levels))
        return
    if args.request_rate is not None:
        parser.error("compare_vllm runs closed-loop levels only (drop --request-rate)")

    model = resolve_model(args.model)
    prompts = build_prompts(args.num_prompts, seed=args.seed)
    print(
        f"model {model}; prompts {len(prompts)} (digest {prompts_digest(prompts)}); "
        f"endpoint {args.endpoint}; "
        f"max_tokens {args.max_tokens}; temperature {args.temperature}; concurrency {args.concurrency}; "
        f"rounds {args.rounds}; nproc {os.cpu_count()}",
        flush=True,
    )
    results: dict[str, list[list[Summary]]] = {name: [] for name in args.contenders}
    with tempfile.TemporaryDirectory(prefix="compare-vllm-") as tmp:
        log_dir = Path(tmp)
        for round_no in range(args.rounds):
            order = round_order(args.contenders, round_no)
            print(f"round {round_no + 1}/{args.rounds}: {' -> '.join(order)}", flush=True)
            for name in order:
                try:
                    if name == "engine":
                        summaries = run_engine(model, args, log_dir)
                    else:
                        summaries = run_server(name, model, args, log_dir)
                except Exception:
                    for log in sorted(log_dir.glob("*.log")):
                        sys.stderr.write(
                            f"--- {log.name} (tail)\n{log.read_text(errors='replace')[-3000:]}\n"
                        )
                    raise
                results[name].append(summaries)
                print(format_table(summaries), flush=True)
    print(report(results, args.concurrency))
    print(markdown(results, args.concurrency))
    if args.json_out:
        args.json_out.write_text(
            json.dumps({k: [[asdict(s) for s in r] for r in v] for k, v in results.items()}, indent=1)
        )


if __name__ == "__main__":
    main()
