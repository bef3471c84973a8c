"""Multi-LoRA throughput on `serve`, paired: the base model with LoRA off and on, one adapter, N adapters
mixed, and M > N adapters cycled through N slots; plus the cost of one adapter swap. Prints figures; asserts
nothing.

Two servers run side by side for the whole benchmark and are driven one at a time: one with LoRA off, one with
LoRA on (`--max-loras N`, N + M adapters registered). Every round runs each scenario once (the order rotates
from round to round, so drift on a shared machine hits every scenario alike); ratios are taken within a round
and reported as the median and min..max over rounds. Besides wall-clock tok/s it reports the CPU seconds the
engine processes (everything under the server process but the API process itself) spent per 1000 output
tokens: other jobs on shared cores inflate wall time far more than CPU time.

Every request is a non-streamed `/v1/completions` at temperature 0 with `ignore_eos`, so each one produces
exactly `--max-tokens` tokens whatever its adapter. The adapters are random PEFT LoRAs (rank `--rank`, every
linear layer): their values do not matter for speed.

The swap probe sends one-token completions one at a time: cycling over N adapters (all resident: hits), then
over the M cycled adapters in least-recently-used order (every request evicts one: misses). vLLM keeps
`max_cpu_loras` (= `--max-loras`) adapters in its CPU cache, so a miss reloads the adapter from disk and
copies it into a slot; swap cost = median(miss latency) - median(hit latency).

`--profile DIR` records the engine of the driven server with py-spy (`--nonblocking`, raw collapsed stacks)
during every scenario of the first round.

Usage: python -m bench.lora_bench [--model PATH] [--dtype auto] [--adapters 8] [--swap-adapters 64]
       [--rank 8] [--requests 96] [--concurrency 16] [--max-tokens 64] [--rounds 3] [--profile DIR]
       (default model: the embedded SmolLM2, in the dtype `serve` picks for it)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import openai
import psutil

from core.textdata import builtin_texts
from tests.support.lora import build_lora_adapter
from tests.support.server import RunningServer, start_server

BASE = "base"


@dataclass(frozen=True)
class Scenario:
    name: str
    lora: bool  # which server
    models: tuple[str, ...]  # request i goes to models[i % len(models)]


@dataclass(frozen=True)
class Result:
    scenario: str
    errors: int
    output_tokens: int
    seconds: float
    engine_cpu_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def cpu_s_per_1k_tokens(self) -> float:
        return 1000 * self.engine_cpu_s / max(self.output_tokens, 1)


def cpu_kind() -> str:
    """What this CPU offers (from /proc/cpuinfo) and whether torch is told otherwise (AVX2 emulation)."""
    flags = set()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    kind = "AMX + AVX-512" if "amx_tile" in flags else "AVX-512" if "avx512f" in flags else "AVX2 only"
    import torch

    if "amx_tile" in flags and not torch.cpu._is_avx512_supported():
        kind += " (torch sees no AVX-512: AVX2 emulation)"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "")
        kind = f"{model}, {kind}, {os.cpu_count()} cores"
    return kind


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def prompts(count: int) -> list[str]:
    """`count` fixed prompts (held-out paragraphs of the built-in corpus, cut to 300 characters)."""
    texts = [t[:300] for t in builtin_texts("heldout") if len(t) > 100]
    return [texts[i % len(texts)] for i in range(count)]


def make_adapters(model: Path, root: Path, count: int, rank: int) -> list[Path]:
    """`count` PEFT adapters: one written by PEFT, the others the same files with other random weights
    (building each with PEFT would load the base model `count` times)."""
    import torch
    from safetensors.torch import load_file, save_file

    first = build_lora_adapter(model, root / "lora0", seed=1, rank=rank)
    tensors = load_file(first / "adapter_model.safetensors")
    paths = [first]
    for i in range(1, count):
        folder = root / f"lora{i}"
        folder.mkdir(parents=True)
        shutil.copy(first / "adapter_config.json", folder)
        gen = torch.Generator().manual_seed(i + 1)
        weights = {k: torch.randn(v.shape, generator=gen).mul_(0.1).to(v.dtype) for k, v in tensors.items()}
        save_file(weights, folder / "adapter_model.safetensors")
        paths.append(folder)
    return paths


def engine_cpu_seconds(server: RunningServer) -> float:
    """User + system CPU seconds of every process under the server's API process (the engine core, and its
    workers where vLLM starts any)."""
    total = 0.0
    for child in psutil.Process(server.process.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            times = child.cpu_times()
            total += times.user + times.system
    return total


def engine_pid(server: RunningServer) -> int:
    """The process that runs the model: the deepest of the server's descendants that uses CPU."""
    children = psutil.Process(server.process.pid).children(recursive=True)
    busy = max(children, key=lambda p: p.cpu_times().user, default=None)
    return busy.pid if busy is not None else server.process.pid


@contextlib.contextmanager
def py_spy(pid: int, output: Path | None) -> Iterator[None]:
    """Record `pid` with py-spy while the block runs (nothing if `output` is None)."""
    if output is None:
        yield
        return
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    command = [exe, "record", "--nonblocking", "-r", "100", "-f", "raw", "-p", str(pid), "-o", str(output)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)


def client_for(server: RunningServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.openai_url, api_key="unused", max_retries=0, timeout=900)


async def complete(client: openai.AsyncOpenAI, model: str, prompt: str, max_tokens: int) -> int:
    out = await client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True}
    )
    return out.usage.completion_tokens if out.usage else 0


async def run_load(server: RunningServer, scenario: Scenario, args: argparse.Namespace) -> Result:
    """`args.requests` completions over `scenario.models`, `args.concurrency` at a time."""
    client = client_for(server)
    jobs = list(enumerate(prompts(args.requests)))
    tokens = errors = 0

    async def worker() -> None:
        nonlocal tokens, errors
        while jobs:
            i, prompt = jobs.pop()
            model = scenario.models[i % len(scenario.models)]
            try:
                # Not `tokens += await ...`: it reads `tokens` before the await, losing other workers' counts.
                done = await complete(client, model, prompt, args.max_tokens)
            except openai.OpenAIError:
                errors += 1
                continue
            tokens += done

    # Warm-up: the last `--max-loras` models of the scenario resident before timing (all of them, unless it
    # cycles through more adapters than there are slots).
    for model in scenario.models[-args.adapters :]:
        await complete(client, model, "warm up", 2)
    cpu = engine_cpu_seconds(server)
    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    seconds = time.perf_counter() - start
    cpu = engine_cpu_seconds(server) - cpu
    await client.close()
    return Result(scenario.name, errors, tokens, seconds, cpu)


async def swap_probe(
    server: RunningServer, resident: Sequence[str], cycled: Sequence[str], n: int
) -> tuple[list[float], list[float]]:
    """Latencies (s) of `n` one-token requests cycling over `resident` adapters (hits), then over `cycled`
    adapters in least-recently-used order (misses)."""
    client = client_for(server)

    async def timed(model: str) -> float:
        start = time.perf_counter()
        await complete(client, model, "The capital of France is", 1)
        return time.perf_counter() - start

    for model in resident:
        await timed(model)
    hits = [await timed(resident[i % len(resident)]) for i in range(n)]
    for model in cycled:  # one full cycle first: from then on, each request asks for the LRU adapter
        await timed(model)
    misses = [await timed(cycled[i % len(cycled)]) for i in range(n)]
    await client.close()
    return hits, misses


def spread(values: Sequence[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}..{fmt.format(max(values))})"


def default_dtype(model_given: bool) -> str:
    """The dtype `serve` picks: float32 for the embedded model on CPU (serve.cli.default_model_settings), else
    the model's own."""
    from serve.engine.vllm_engine import is_cpu_build

    return "float32" if not model_given and is_cpu_build() else "auto"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: embedded SmolLM2)")
    parser.add_argument("--dtype", default=None, help="serve --dtype (default: what serve picks)")
    parser.add_argument(
        "--adapters", type=int, default=8, help="N: --max-loras and adapters in the mixed run"
    )
    parser.add_argument("--swap-adapters", type=int, default=64, help="M > N adapters cycled (0: skip)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank of every adapter")
    parser.add_argument("--requests", type=int, default=96, help="requests per scenario")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    parser.add_argument("--max-tokens", type=int, default=64, help="completion tokens per request")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every scenario")
    parser.add_argument("--probe-requests", type=int, default=32, help="requests per swap-probe series")
    parser.add_argument(
        "--omp-threads-bind", default=None, help="VLLM_CPU_OMP_THREADS_BIND for the servers (default: vLLM's)"
    )
    parser.add_argument("--avx2-emulation", action="store_true", help="servers see an AVX2-only CPU")
    parser.add_argument("--profile", type=Path, default=None, help="py-spy the engine in round 1 into DIR")
    args = parser.parse_args()
    # SIGTERM (e.g. from `timeout`) unwinds normally, so the servers started below are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    dtype = args.dtype or default_dtype(args.model is not None)
    if args.model is None:
        from core.default_model import ensure_default_model

        args.model = ensure_default_model()
    # As `serve` runs outside the tests: vLLM's multiprocess executor (tests/support/server.py defaults to 0).
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    if args.omp_threads_bind is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = args.omp_threads_bind
    if args.avx2_emulation:
        from tests.support.avx2 import avx2_env

        env |= avx2_env()
        os.environ.update(avx2_env())  # so that cpu_kind() below sees what the servers see
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)

    mixed = [f"lora{i}" for i in range(args.adapters)]
    cycled = [f"lora{i}" for i in range(args.adapters, args.adapters + args.swap_adapters)]
    scenarios = [
        Scenario("base (LoRA off)", False, (BASE,)),
        Scenario("base (LoRA on)", True, (BASE,)),
        Scenario("1 adapter", True, tuple(mixed[:1])),
        Scenario(f"{args.adapters} adapters mixed", True, tuple(mixed)),
    ]
    if args.swap_adapters > args.adapters:
        scenarios.append(Scenario(f"{args.swap_adapters} adapters cycled", True, tuple(cycled)))
    results: dict[str, list[Result]] = {s.name: [] for s in scenarios}
    started, load_start = time.strftime("%Y-%m-%d %H:%M:%S %Z"), load_average()
    with tempfile.TemporaryDirectory(prefix="lora-bench-") as tmp, contextlib.ExitStack() as stack:
        paths = make_adapters(args.model, Path(tmp) / "adapters", len(mixed) + len(cycled), args.rank)
        specs = [f"{name}={path}" for name, path in zip(mixed + cycled, paths, strict=True)]
        common = ["--served-model-name", BASE, "--max-model-len", "1024", "--dtype", dtype]
        lora_args = ["--max-loras", str(args.adapters), "--max-lora-rank", str(args.rank), "--lora-modules"]
        servers = {
            False: stack.enter_context(start_server(args.model, *common, env=env, log_dir=tmp)),
            True: stack.enter_context(
                start_server(args.model, *common, *lora_args, *specs, env=env, log_dir=tmp)
            ),
        }
        for r in range(args.rounds):
            for k in range(len(scenarios)):
                scenario = scenarios[(k + r) % len(scenarios)]
                server = servers[scenario.lora]
                profile = (
                    args.profile / f"{scenario.name.replace(' ', '_')}.txt"
                    if args.profile and r == 0
                    else None
                )
                with py_spy(engine_pid(server), profile):
                    result = asyncio.run(run_load(server, scenario, args))
                results[scenario.name].append(result)
                print(
                    f"round {r + 1} {scenario.name:<24} {result.tokens_per_s:8.1f} tok/s "
                    f"{result.cpu_s_per_1k_tokens:7.2f} engine CPU-s/1k tok  errors {result.errors}"
                    f"  (load {load_average()})",
                    flush=True,
                )
        probe = None
        if cycled:
            probe = asyncio.run(swap_probe(servers[True], mixed, cycled, args.probe_requests))

    print()
    print(f"CPU: {cpu_kind()}")
    print(f"started {started}, load average {load_start} at start, {load_average()} at end")
    print(
        f"model {args.model.name} ({dtype}): {args.requests} requests per scenario, concurrency "
        f"{args.concurrency}, {args.max_tokens} tokens each, rank {args.rank}, --max-loras {args.adapters}, "
        f"{args.rounds} rounds; median (min..max) over rounds"
    )
    print(f"{'scenario':<24}{'errors':>7}{'tok/s':>24}{'engine CPU-s per 1k tokens':>30}")
    for name, rows in results.items():
        tok_s = spread([r.tokens_per_s for r in rows], "{:.1f}")
        cpu = spread([r.cpu_s_per_1k_tokens for r in rows])
        print(f"{name:<24}{sum(r.errors for r in rows):>7}{tok_s:>24}{cpu:>30}")

    def ratio(num: str, den: str) -> None:
        tok = [n.tokens_per_s / d.tokens_per_s for n, d in zip(results[num], results[den], strict=True)]
        cpu = [
            d.cpu_s_per_1k_tokens / n.cpu_s_per_1k_tokens
            for n, d in zip(results[num], results[den], strict=True)
        ]
        print(f"{num} / {den}: tok/s {spread(tok)}, CPU per token (inverse) {spread(cpu)}")

    ratio("base (LoRA on)", "base (LoRA off)")
    ratio("1 adapter", "base (LoRA on)")
    ratio(f"{args.adapters} adapters mixed", "base (LoRA on)")
    if cycled:
        ratio(f"{args.swap_adapters} adapters cycled", f"{args.adapters} adapters mixed")
    if probe is not None:
        hits, misses = probe
        ms = "{:.1f}"
        resident, swapped = spread([1e3 * h for h in hits], ms), spread([1e3 * m for m in misses], ms)
        print(
            f"swap probe ({args.probe_requests} one-token requests each): resident {resident} ms, "
            f"swapped in {swapped} ms; swap cost "
            f"{1e3 * (statistics.median(misses) - statistics.median(hits)):.1f} ms per adapter change"
        )


if __name__ == "__main__":
    main()
