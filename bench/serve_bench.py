"""Load generator for any OpenAI-compatible server (in the style of vLLM's `benchmark_serving`).

Streams chat or completion requests built from a fixed seeded prompt set, closed-loop (N clients, each sending
its next request when the last one finished) or with Poisson arrivals, and reports request throughput, output
tokens/s, TTFT, TPOT and ITL (p50/p99) and the error count.

Definitions (per request; times from just before the request is sent):
- TTFT: until the first SSE chunk that carries generated text (a role-only chat chunk is not a token).
- ITL: gaps between consecutive text-carrying chunks.
- TPOT: (latency - TTFT) / (output tokens - 1), for requests with more than one output token.
- output tokens: `usage.completion_tokens` of the final chunk (`stream_options.include_usage`); where a server
  sends no usage, the number of text-carrying chunks.
Throughput figures divide by the wall time from the first request sent to the last response finished.

Usage: python -m bench.serve_bench --base-url http://127.0.0.1:8000/v1 --model NAME --concurrency 1 8 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import httpx

from bench.prompts import Prompt, build_prompts, prompts_digest

Clock = Callable[[], float]


@dataclass(frozen=True)
class LoadConfig:
    """What to send and how."""

    base_url: str
    model: str
    api_key: str | None = None
    endpoint: str = "chat"  # "chat" or "completions"
    max_tokens: int = 64
    temperature: float = 0.0
    ignore_eos: bool = False  # vLLM extension; only sent when set
    concurrency: int = 1
    request_rate: float | None = None  # requests/s with Poisson arrivals; None: closed loop
    num_requests: int = 32
    seed: int = 0
    timeout_s: float = 300.0


@dataclass
class RequestResult:
    """The measurements of one request."""

    ok: bool = False
    start: float = 0.0
    latency: float = 0.0
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int | None = None
    usage_reported: bool = False
    error: str | None = None


@dataclass(frozen=True)
class Summary:
    """Aggregate figures of one load run (times in milliseconds)."""

    concurrency: int
    request_rate: float | None
    num_requests: int
    completed: int
    errors: int
    duration_s: float
    request_throughput: float
    output_throughput: float
    total_output_tokens: int
    usage_reported: int
    ttft_p50_ms: float
    ttft_p99_ms: float
    tpot_p50_ms: float
    tpot_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    e2e_p50_ms: float
    error_samples: list[str]
    api_cpu_ms_per_request: float = math.nan  # CPU of the server's API process, when a probe was given


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks (numpy's default);
    NaN for no values."""
    if not 0 <= q <= 100:
        raise ValueError("q must be within 0..100")
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def request_body(cfg: LoadConfig, prompt: Prompt) -> dict[str, Any]:
    """The JSON body of one streaming request."""
    body: dict[str, Any] = {
        "model": cfg.model,
        "max_tokens": cfg.max_tokens,
        "temperature": cfg.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if cfg.endpoint == "chat":
        body["messages"] = prompt.messages
    elif cfg.endpoint == "completions":
        body["prompt"] = prompt.text
    else:
        raise ValueError(f"endpoint must be 'chat' or 'completions', got {cfg.endpoint!r}")
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    return body


def _chunk_text(chunk: dict[str, Any]) -> str:
    """Generated text in a streamed chunk (chat delta content or completion text), '' if none."""
    text = ""
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta")
        part = delta.get("content") if isinstance(delta, dict) else choice.get("text")
        if part:
            text += part
    return text


async def send_request(
    client: httpx.AsyncClient, cfg: LoadConfig, prompt: Prompt, clock: Clock = time.perf_counter
) -> RequestResult:
    """Send one streaming request and time its chunks; never raises (failures become `error`)."""
    path = "/chat/completions" if cfg.endpoint == "chat" else "/completions"
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    result = RequestResult(start=clock())
    chunks_with_text = 0
    last_token_at = 0.0
    done = False
    try:
        async with client.stream(
            "POST", cfg.base_url.rstrip("/") + path, json=request_body(cfg, prompt), headers=headers
        ) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {body[:200]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    done = True
                    break
                now = clock()
                chunk = json.loads(payload)
                if "error" in chunk:
                    result.error = f"error frame: {json.dumps(chunk['error'])[:200]}"
                    return result
                if _chunk_text(chunk):
                    if result.ttft is None:
                        result.ttft = now - result.start
                    else:
                        result.itl.append(now - last_token_at)
                    last_token_at = now
                    chunks_with_text += 1
                usage = chunk.get("usage")
                if usage:
                    result.usage_reported = True
                    result.output_tokens = int(usage.get("completion_tokens") or 0)
                    result.prompt_tokens = usage.get("prompt_tokens")
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"[:200]
        return result
    finally:
        result.latency = clock() - result.start
    if not done:
        result.error = "stream ended without [DONE]"
        return result
    if not result.usage_reported:
        result.output_tokens = chunks_with_text
    result.ok = True
    return result


def make_client(concurrency: int, timeout_s: float) -> httpx.AsyncClient:
    """An HTTP/1.1 keep-alive client with one connection per concurrent request."""
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    return httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout_s, connect=10.0))


async def run_load(
    cfg: LoadConfig,
    prompts: Sequence[Prompt],
    client: httpx.AsyncClient | None = None,
    clock: Clock = time.perf_counter,
) -> tuple[list[RequestResult], float]:
    """Send `cfg.num_requests` requests (prompt i is `prompts[i % len(prompts)]`); returns the results in
    request order and the wall time in seconds. Closed loop with `cfg.concurrency` clients, or Poisson
    arrivals at `cfg.request_rate` (seeded) with at most `cfg.concurrency` in flight."""
    own_client = client is None
    http = client or make_client(cfg.concurrency, cfg.timeout_s)
    results: list[RequestResult | None] = [None] * cfg.num_requests
    start = clock()
    try:
        if cfg.request_rate is None:
            next_index = iter(range(cfg.num_requests))

            async def worker() -> None:
                for i in next_index:
                    results[i] = await send_request(http, cfg, prompts[i % len(prompts)], clock)

            await asyncio.gather(*(worker() for _ in range(min(cfg.concurrency, cfg.num_requests))))
        else:
            rng = random.Random(cfg.seed)
            gate = asyncio.Semaphore(cfg.concurrency)

            async def one(i: int) -> None:
                async with gate:
                    results[i] = await send_request(http, cfg, prompts[i % len(prompts)], clock)

            tasks = []
            for i in range(cfg.num_requests):
                tasks.append(asyncio.create_task(one(i)))
                if i + 1 < cfg.num_requests:
                    await asyncio.sleep(rng.expovariate(cfg.request_rate))
            await asyncio.gather(*tasks)
    finally:
        if own_client:
            await http.aclose()
    duration = clock() - start
    return [r for r in results if r is not None], duration


def summarize(cfg: LoadConfig, results: Sequence[RequestResult], duration: float) -> Summary:
    """Aggregate per-request results into the reported figures."""
    ok = [r for r in results if r.ok]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    tpots = [
        (r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.ttft is not None and r.output_tokens > 1
    ]
    itls = [gap for r in ok for gap in r.itl]
    total_output = sum(r.output_tokens for r in ok)
    errors = [r.error or "unknown" for r in results if not r.ok]

    def ms(values: Sequence[float], q: float) -> float:
        return percentile(values, q) * 1000

    return Summary(
        concurrency=cfg.concurrency,
        request_rate=cfg.request_rate,
        num_requests=len(results),
        completed=len(ok),
        errors=len(errors),
        duration_s=duration,
        request_throughput=len(ok) / duration if duration > 0 else math.nan,
        output_throughput=total_output / duration if duration > 0 else math.nan,
        total_output_tokens=total_output,
        usage_reported=sum(r.usage_reported for r in ok),
        ttft_p50_ms=ms(ttfts, 50),
        ttft_p99_ms=ms(ttfts, 99),
        tpot_p50_ms=ms(tpots, 50),
        tpot_p99_ms=ms(tpots, 99),
        itl_p50_ms=ms(itls, 50),
        itl_p99_ms=ms(itls, 99),
        e2e_p50_ms=ms([r.latency for r in ok], 50),
        error_samples=sorted(set(errors))[:3],
    )


async def wait_ready(base_url: str, timeout_s: float = 300.0, probe: str = "/models") -> None:
    """Poll `{base_url}{probe}` until it answers 200 (raises TimeoutError)."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=5.0) as client:
        while True:
            try:
                if (await client.get(base_url.rstrip("/") + probe)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{base_url} not ready after {timeout_s:.0f} s")
            await asyncio.sleep(0.5)


def default_num_requests(concurrency: int) -> int:
    """Requests per level when not given: enough for p99 figures to mean something at every level."""
    return max(32, 8 * concurrency)


async def run_levels(
    base: LoadConfig,
    prompts: Sequence[Prompt],
    concurrencies: Sequence[int],
    num_requests: int | None = None,
    warmup: int = 4,
    cpu_seconds: Callable[[], float] | None = None,
) -> list[Summary]:
    """Warm up with `warmup` sequential requests, then one load run per concurrency level. With
    `cpu_seconds` (the server's API-process CPU time so far), each level also reports that process's CPU
    milliseconds per completed request."""
    if warmup:
        warm = replace(base, concurrency=1, num_requests=warmup, request_rate=None)
        await run_load(warm, prompts)
    summaries = []
    for concurrency in concurrencies:
        cfg = replace(
            base, concurrency=concurrency, num_requests=num_requests or default_num_requests(concurrency)
        )
        cpu_before = cpu_seconds() if cpu_seconds else 0.0
        results, duration = await run_load(cfg, prompts)
        summary = summarize(cfg, results, duration)
        if cpu_seconds is not None and summary.completed:
            summary = replace(
                summary, api_cpu_ms_per_request=(cpu_seconds() - cpu_before) * 1e3 / summary.completed
            )
        summaries.append(summary)
    return summaries


TABLE_COLUMNS = (
    ("conc", "concurrency", "{:>4d}"),
    ("req/s", "request_throughput", "{:>7.2f}"),
    ("out tok/s", "output_throughput", "{:>9.1f}"),
    ("TTFT p50", "ttft_p50_ms", "{:>8.1f}"),
    ("TTFT p99", "ttft_p99_ms", "{:>8.1f}"),
    ("TPOT p50", "tpot_p50_ms", "{:>8.2f}"),
    ("TPOT p99", "tpot_p99_ms", "{:>8.2f}"),
    ("ITL p50", "itl_p50_ms", "{:>7.2f}"),
    ("ITL p99", "itl_p99_ms", "{:>7.2f}"),
    ("errors", "errors", "{:>6d}"),
)


def format_table(summaries: Sequence[Summary]) -> str:
    """A fixed-width table of summaries (times in ms)."""
    header = "  ".join(f"{name:>{len(fmt.format(0))}}" for name, _, fmt in TABLE_COLUMNS)
    rows = ["  ".join(fmt.format(getattr(s, key)) for _, key, fmt in TABLE_COLUMNS) for s in summaries]
    return "\n".join([header, *rows])


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    """The load flags shared with compare_vllm.py."""
    parser.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--num-requests", type=int, default=None, help="per level; default max(32, 8*conc)")
    parser.add_argument("--request-rate", type=float, default=None, help="Poisson arrivals (req/s)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--ignore-eos", action="store_true", help="send vLLM's ignore_eos extension")
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=4)


def load_config(args: argparse.Namespace, base_url: str, model: str, api_key: str | None) -> LoadConfig:
    """The `LoadConfig` of the shared load flags (concurrency and request count are set per level)."""
    return LoadConfig(
        base_url=base_url,
        model=model,
        api_key=api_key,
        endpoint=args.endpoint,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        ignore_eos=args.ignore_eos,
        request_rate=args.request_rate,
        seed=args.seed,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--model", required=True)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--json", action="store_true", help="also print one JSON line per level")
    add_load_arguments(parser)
    args = parser.parse_args(argv)
    prompts = build_prompts(args.num_prompts, seed=args.seed)
    base = load_config(args, args.base_url, args.model, args.api_key)
    print(
        f"prompts: {len(prompts)} (digest {prompts_digest(prompts)}), endpoint {args.endpoint}, "
        f"max_tokens {args.max_tokens}, temperature {args.temperature}"
    )
    summaries = asyncio.run(run_levels(base, prompts, args.concurrency, args.num_requests, args.warmup))
    print(format_table(summaries))
    for s in summaries:
        if s.error_samples:
            print(f"conc {s.concurrency}: {s.errors} errors, e.g. {s.error_samples}")
        if args.json:
            print("JSON " + json.dumps(asdict(s)))


if __name__ == "__main__":
    main()
