"""Cross-check of compare_vllm.py with vLLM's own load tool, guidellm: ours against vLLM's server.

At one concurrency level, each round starts every contender in turn (one at a time, the order alternating from
round to round), runs one `guidellm run` against it and stops it. The servers are started by compare_vllm.py's
`started_server`, so they get the very command line, engine flags and environment compare_vllm.py gives.

guidellm (pinned in requirements/guidellm.lock, its own environment: `make guidellm-env`) runs closed-loop
(`--profile kind=concurrent,streams=N`) on synthetic text with fixed prompt and output token counts (it sends
`ignore_eos` and `max_completion_tokens`, so every request generates exactly `--output-tokens`), a fixed
number of requests plus `--warmup` more (those that start before request warmup+1 starts are left out of its
metrics), the local model folder as tokenizer, fully offline (HF_HUB_OFFLINE=1). Figures are guidellm's own
(its JSON report, successful requests): output tok/s and req/s (the means it prints as server throughput),
TTFT, ITL and TPOT medians. Ratios ours/vllm are taken within a round (paired); medians over rounds with
[min..max] are printed.

guidellm 0.8 replaced the old `guidellm benchmark --rate-type concurrent --rate N` with
`guidellm run --profile kind=concurrent,streams=N`; the exact command of every run is printed.

Usage: python -m bench.guidellm_check --model tiny|smollm2|PATH --rounds 3 --concurrency 8 \\
           --num-requests 128 --prompt-tokens 128 --output-tokens 64
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.compare_vllm import (
    REPO_ROOT,
    add_contender_arguments,
    resolve_model,
    round_order,
    started_server,
)
from bench.engine_direct import add_engine_arguments

CONTENDERS = ("ours", "vllm")
DEFAULT_GUIDELLM = REPO_ROOT / ".venv" / "guidellm" / "bin" / "guidellm"
REQUEST_FORMATS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


@dataclass(frozen=True)
class Result:
    """One guidellm run's figures (successful requests)."""

    contender: str
    round: int
    output_tok_s: float
    request_s: float
    ttft_p50_ms: float
    itl_p50_ms: float
    tpot_p50_ms: float
    successful: int
    errored: int
    incomplete: int
    prompt_tokens_mean: float
    output_tokens_mean: float
    duration_s: float


def guidellm_command(args: argparse.Namespace, base_url: str, model: Path, out_json: Path) -> list[str]:
    """The `guidellm run` command line (flags as guidellm 0.8.1's `run --help` and schemas define them)."""
    backend = (
        f"kind=openai_http,target={base_url},model={args.served_model_name},"
        f"request_format={REQUEST_FORMATS[args.endpoint]}"
    )
    profile = f"kind=concurrent,streams={args.concurrency}"
    if args.warmup:
        profile += f",warmup.value={args.warmup},warmup.mode=requests"
    return [
        str(args.guidellm),
        "run",
        "--backend",
        backend,
        "--profile",
        profile,
        "--constraint",
        f"kind=max_requests,count={args.num_requests + args.warmup}",
        "--tokenizer",
        f"kind=huggingface_auto,model={model}",
        "--data",
        f"kind=synthetic_text,prompt_tokens={args.prompt_tokens},output_tokens={args.output_tokens}",
        "--seed",
        f"kind=static,value={args.seed}",
        "--output",
        f"kind=json,path={out_json}",
        "--disable-progress",
    ]


def guidellm_env(args: argparse.Namespace, log_file: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        GUIDELLM__MAX_WORKER_PROCESSES=str(args.guidellm_workers),
        GUIDELLM__LOGGING__LOG_FILE=str(log_file),
    )
    return env


def parse_report(path: Path, contender: str, round_no: int) -> Result:
    """The figures of the single benchmark in a guidellm JSON report."""
    report = json.loads(path.read_text())
    (bench,) = report["benchmarks"]
    m = bench["metrics"]

    def ok(name: str, stat: str = "median") -> float:
        return float(m[name]["successful"][stat])

    totals = m["request_totals"]
    return Result(
        contender=contender,
        round=round_no,
        output_tok_s=ok("output_tokens_per_second", "mean"),
        request_s=ok("requests_per_second", "mean"),
        ttft_p50_ms=ok("time_to_first_token_ms"),
        itl_p50_ms=ok("inter_token_latency_ms"),
        tpot_p50_ms=ok("time_per_output_token_ms"),
        successful=int(totals["successful"]),
        errored=int(totals["errored"]),
        incomplete=int(totals["incomplete"]),
        prompt_tokens_mean=ok("prompt_token_count", "mean"),
        output_tokens_mean=ok("output_token_count", "mean"),
        duration_s=float(bench["duration"]),
    )


def run_contender(name: str, model: Path, args: argparse.Namespace, out_dir: Path, round_no: int) -> Result:
    """Start `name` as compare_vllm.py does, run guidellm against it, stop it."""
    server_args = copy.copy(args)
    server_args.concurrency = [args.concurrency]  # compare_vllm's server_command takes a list of levels
    out_json = out_dir / f"guidellm-{name}-r{round_no}.json"
    gl_log = out_dir / f"guidellm-{name}-r{round_no}.log"
    with started_server(name, model, server_args, out_dir) as (_proc, base_url):
        cmd = guidellm_command(args, base_url, model, out_json)
        print("  $ " + " ".join(cmd), flush=True)
        proc = subprocess.run(
            cmd,
            env=guidellm_env(args, out_dir / f"guidellm-{name}-r{round_no}.debug.log"),
            cwd=out_dir,
            capture_output=True,
            timeout=args.guidellm_timeout,
            check=False,
        )
        gl_log.write_bytes(proc.stdout + proc.stderr)
        if proc.returncode != 0 or not out_json.exists():
            tail = (proc.stdout + proc.stderr).decode(errors="replace")[-4000:]
            raise RuntimeError(f"guidellm failed ({proc.returncode}) against {name}; log {gl_log}\n{tail}")
    result = parse_report(out_json, name, round_no)
    print(f"  {name}: {format_result(result)}", flush=True)
    return result


def format_result(r: Result) -> str:
    return (
        f"out tok/s {r.output_tok_s:8.1f}  req/s {r.request_s:6.2f}  TTFT p50 {r.ttft_p50_ms:8.1f} ms  "
        f"ITL p50 {r.itl_p50_ms:6.2f} ms  TPOT p50 {r.tpot_p50_ms:6.2f} ms  "
        f"ok {r.successful} err {r.errored} incomplete {r.incomplete}  "
        f"tokens/request in {r.prompt_tokens_mean:.1f} out {r.output_tokens_mean:.1f}  {r.duration_s:.1f} s"
    )


def spread(values: Sequence[float], fmt: str = ".3f") -> str:
    if not values:
        return "n/a"
    return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}..{max(values):{fmt}}]"


METRICS = (
    ("output_tok_s", "out tok/s", ".1f"),
    ("request_s", "req/s", ".3f"),
    ("ttft_p50_ms", "TTFT p50 ms", ".1f"),
    ("itl_p50_ms", "ITL p50 ms", ".2f"),
    ("tpot_p50_ms", "TPOT p50 ms", ".2f"),
)


def report(results: dict[str, list[Result]]) -> str:
    """Per contender medians over rounds [min..max], and the paired ratios ours/vllm."""
    lines = []
    for name, rounds in results.items():
        if not rounds:
            continue
        errors = sum(r.errored + r.incomplete for r in rounds)
        lines.append(f"\n{name}: median [min..max] over {len(rounds)} rounds; errored+incomplete {errors}")
        for key, label, fmt in METRICS:
            lines.append(f"  {label:<12} {spread([getattr(r, key) for r in rounds], fmt)}")
    ours, theirs = results.get("ours", []), results.get("vllm", [])
    if ours and theirs:
        lines.append("\nratios ours/vllm paired by round, median [min..max] (tok/s: >1 = ours faster)")
        for key, label, _fmt in METRICS:
            ratios = [getattr(o, key) / getattr(v, key) for o, v in zip(ours, theirs, strict=False)]
            lines.append(f"  {label:<12} {spread(ratios)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_contender_arguments(parser, CONTENDERS)
    parser.add_argument("--concurrency", type=int, default=8, help="guidellm concurrent streams")
    parser.add_argument("--num-requests", type=int, default=128, help="measured requests (after the warmup)")
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="requests excluded from the metrics (default 2 x concurrency; guidellm's warmup ends when "
        "request warmup+1 starts, so below the concurrency it excludes nothing)",
    )
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--endpoint", choices=sorted(REQUEST_FORMATS), default="chat")
    parser.add_argument("--seed", type=int, default=0, help="guidellm's synthetic data seed")
    parser.add_argument("--guidellm", type=Path, default=DEFAULT_GUIDELLM, help="the guidellm executable")
    parser.add_argument(
        "--guidellm-workers",
        type=int,
        default=1,
        help="guidellm worker processes (GUIDELLM__MAX_WORKER_PROCESSES; its default 10 competes for cores)",
    )
    parser.add_argument("--guidellm-timeout", type=float, default=1800.0, help="seconds per guidellm run")
    parser.add_argument("--out-dir", type=Path, default=None, help="keep logs and guidellm JSON reports here")
    parser.add_argument("--json-out", type=Path, default=None, help="write every round's figures here")
    add_engine_arguments(parser)
    args = parser.parse_args(argv)
    if args.warmup is None:
        args.warmup = 2 * args.concurrency
    if not args.guidellm.exists():
        parser.error(f"{args.guidellm} not found: run `make guidellm-env`")

    model = resolve_model(args.model)
    version = subprocess.run(
        [str(args.guidellm), "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    print(
        f"model {model}; {version}; concurrency {args.concurrency}; requests {args.num_requests} "
        f"(+{args.warmup} warmup); prompt/output tokens {args.prompt_tokens}/{args.output_tokens}; "
        f"endpoint {args.endpoint}; rounds {args.rounds}; nproc {os.cpu_count()}",
        flush=True,
    )
    results: dict[str, list[Result]] = {name: [] for name in args.contenders}
    with tempfile.TemporaryDirectory(prefix="guidellm-check-") as tmp:
        out_dir = args.out_dir or Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        for round_no in range(args.rounds):
            order = round_order(args.contenders, round_no)
            print(f"round {round_no + 1}/{args.rounds}: {' -> '.join(order)}", flush=True)
            for name in order:
                try:
                    results[name].append(run_contender(name, model, args, out_dir, round_no))
                except Exception:
                    for log in sorted(out_dir.glob("*.log")):
                        sys.stderr.write(
                            f"--- {log.name} (tail)\n{log.read_text(errors='replace')[-3000:]}\n"
                        )
                    raise
    print(report(results))
    if args.json_out:
        args.json_out.write_text(
            json.dumps(
                {"args": {k: str(v) for k, v in vars(args).items()}}
                | {k: [asdict(r) for r in v] for k, v in results.items()},
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
