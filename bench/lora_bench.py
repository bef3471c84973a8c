"""Multi-LoRA throughput: the same closed-loop load against the base model, one adapter, and N adapters
mixed round-robin, on one `serve` process (LoRA on, `--max-loras N`); plus the base model on a server with
LoRA off, to show what enabling LoRA costs by itself. Prints the figures and the ratios; asserts nothing.

The adapters are random-init PEFT LoRAs made for the model on the fly (tests/support/lora.py): their
weights do not matter for speed, only their rank and target modules (all linear layers).

Usage: python -m bench.lora_bench [--model PATH] [--adapters 8] [--rank 8] [--requests 96]
       [--concurrency 16] [--max-tokens 64]   (default model: the embedded SmolLM2)
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import openai

from core.textdata import builtin_texts
from tests.support.lora import build_lora_adapter
from tests.support.server import start_server

BASE = "base"


@dataclass(frozen=True)
class Result:
    scenario: str
    requests: int
    errors: int
    output_tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def requests_per_s(self) -> float:
        return (self.requests - self.errors) / self.seconds


def prompts(count: int) -> list[str]:
    """`count` fixed prompts (held-out paragraphs of the built-in corpus, cut to 300 characters)."""
    texts = [t[:300] for t in builtin_texts("heldout") if len(t) > 100]
    return [texts[i % len(texts)] for i in range(count)]


async def run_load(url: str, models: list[str], args: argparse.Namespace, name: str) -> Result:
    """`args.requests` completions, request i on `models[i % len(models)]`, `args.concurrency` at a time."""
    client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
    jobs = list(enumerate(prompts(args.requests)))
    tokens = errors = 0

    async def worker() -> None:
        nonlocal tokens, errors
        while jobs:
            i, prompt = jobs.pop()
            try:
                out = await client.completions.create(
                    model=models[i % len(models)], prompt=prompt, max_tokens=args.max_tokens, temperature=0
                )
                tokens += out.usage.completion_tokens if out.usage else 0
            except openai.OpenAIError:
                errors += 1

    for model in models:  # warm-up: every adapter loaded once before timing
        await client.completions.create(model=model, prompt="warm up", max_tokens=2)
    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    seconds = time.perf_counter() - start
    await client.close()
    return Result(name, args.requests, errors, tokens, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: embedded SmolLM2)")
    parser.add_argument("--adapters", type=int, default=8, help="adapters in the mixed run")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank of every adapter")
    parser.add_argument("--requests", type=int, default=96, help="requests per scenario")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    parser.add_argument("--max-tokens", type=int, default=64, help="completion tokens per request")
    args = parser.parse_args()
    # SIGTERM (e.g. from `timeout`) unwinds normally, so the servers started below are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.model is None:
        from core.default_model import ensure_default_model

        args.model = ensure_default_model()

    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="lora-bench-") as tmp:
        names = [f"lora{i}" for i in range(args.adapters)]
        specs = [
            f"{name}={build_lora_adapter(args.model, Path(tmp) / name, seed=i + 1, rank=args.rank)}"
            for i, name in enumerate(names)
        ]
        common = ["--served-model-name", BASE, "--max-model-len", "1024"]
        with start_server(args.model, *common, log_dir=tmp) as server:
            results.append(asyncio.run(run_load(server.openai_url, [BASE], args, "base (LoRA off)")))
        lora_args = ["--max-loras", str(args.adapters), "--max-lora-rank", str(args.rank)]
        with start_server(args.model, *common, *lora_args, "--lora-modules", *specs, log_dir=tmp) as server:
            results.append(asyncio.run(run_load(server.openai_url, [BASE], args, "base (LoRA on)")))
            results.append(asyncio.run(run_load(server.openai_url, names[:1], args, "1 adapter")))
            results.append(
                asyncio.run(run_load(server.openai_url, names, args, f"{args.adapters} adapters mixed"))
            )

    print(
        f"model {args.model.name}: {args.requests} requests per scenario, concurrency {args.concurrency}, "
        f"max_tokens {args.max_tokens}, rank {args.rank}"
    )
    print(
        f"{'scenario':<22}{'errors':>7}{'out tokens':>12}{'seconds':>9}{'req/s':>8}{'tok/s':>9}{'ratio':>7}"
    )
    reference = results[0].tokens_per_s
    for r in results:
        print(
            f"{r.scenario:<22}{r.errors:>7}{r.output_tokens:>12}{r.seconds:>9.2f}{r.requests_per_s:>8.2f}"
            f"{r.tokens_per_s:>9.1f}{r.tokens_per_s / reference:>7.2f}"
        )
    mixed, single = results[-1].tokens_per_s, results[-2].tokens_per_s
    print(f"1 adapter / base (LoRA on): {single / results[1].tokens_per_s:.2f}")
    print(f"{args.adapters} adapters mixed / base (LoRA on): {mixed / results[1].tokens_per_s:.2f}")
    print(f"{args.adapters} adapters mixed / 1 adapter: {mixed / single:.2f}")


if __name__ == "__main__":
    main()
