"""The engine-direct ceiling: the same prompts and concurrency as `serve_bench`, sent to vLLM's `AsyncLLM` in
this process with no HTTP, so the cost of an HTTP layer (ours or vLLM's) is visible.

Measured like serve_bench: TTFT until the first output carrying tokens, ITL between outputs carrying tokens,
output tokens counted from the engine's token ids. Chat prompts go through the model's chat template
(`add_generation_prompt=True`), as the servers do.

Usage: python -m bench.engine_direct --model PATH --concurrency 1 8 32 [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, replace
from typing import Any

from bench.prompts import Prompt, build_prompts, prompts_digest
from bench.serve_bench import (
    LoadConfig,
    RequestResult,
    Summary,
    add_load_arguments,
    default_num_requests,
    format_table,
    summarize,
)
from serve.engine import cpu_env


def engine_args(args: argparse.Namespace) -> Any:
    """`AsyncEngineArgs` with the settings compare_vllm.py gives both servers."""
    from vllm import AsyncEngineArgs

    return AsyncEngineArgs(
        model=args.model,
        served_model_name=args.served_model_name,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        enforce_eager=True,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        disable_log_stats=False,
    )


def prompt_token_ids(tokenizer: Any, prompts: Sequence[Prompt], endpoint: str) -> list[list[int]]:
    """Token ids of each prompt as the servers would build them."""
    if endpoint == "chat":
        return [
            list(
                tokenizer.apply_chat_template(
                    p.messages, add_generation_prompt=True, tokenize=True, return_dict=False
                )
            )
            for p in prompts
        ]
    return [tokenizer.encode(p.text) for p in prompts]


async def one_request(llm: Any, ids: list[int], cfg: LoadConfig) -> RequestResult:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(
        max_tokens=cfg.max_tokens,
        temperature=cfg.temperature,
        ignore_eos=cfg.ignore_eos,
        output_kind=RequestOutputKind.DELTA,
    )
    result = RequestResult(start=time.perf_counter(), prompt_tokens=len(ids), usage_reported=True)
    last = 0.0
    try:
        async for out in llm.generate(TokensPrompt(prompt_token_ids=ids), params, uuid.uuid4().hex):
            now = time.perf_counter()
            new = len(out.outputs[0].token_ids)
            if new:
                if result.ttft is None:
                    result.ttft = now - result.start
                else:
                    result.itl.append(now - last)
                last = now
                result.output_tokens += new
        result.ok = True
    except Exception as exc:  # report, do not stop the run
        result.error = f"{type(exc).__name__}: {exc}"[:200]
    result.latency = time.perf_counter() - result.start
    return result


async def run_level(llm: Any, ids: list[list[int]], cfg: LoadConfig) -> Summary:
    """Closed loop: `cfg.concurrency` workers share `cfg.num_requests` requests."""
    results: list[RequestResult | None] = [None] * cfg.num_requests
    counter = itertools.count()

    async def worker() -> None:
        while (i := next(counter)) < cfg.num_requests:
            results[i] = await one_request(llm, ids[i % len(ids)], cfg)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(cfg.concurrency, cfg.num_requests))))
    return summarize(cfg, [r for r in results if r is not None], time.perf_counter() - start)


async def run(args: argparse.Namespace) -> list[Summary]:
    from transformers import AutoTokenizer
    from vllm.v1.engine.async_llm import AsyncLLM

    prompts = build_prompts(args.num_prompts, seed=args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ids = prompt_token_ids(tokenizer, prompts, args.endpoint)
    llm = AsyncLLM.from_engine_args(engine_args(args))
    try:
        base = LoadConfig(
            base_url="engine://direct",
            model=args.served_model_name,
            endpoint=args.endpoint,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            ignore_eos=args.ignore_eos,
        )
        if args.warmup:
            await run_level(llm, ids, replace(base, num_requests=args.warmup))
        summaries = []
        for concurrency in args.concurrency:
            num = args.num_requests or default_num_requests(concurrency)
            summaries.append(
                await run_level(llm, ids, replace(base, concurrency=concurrency, num_requests=num))
            )
        return summaries
    finally:
        llm.shutdown()


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Engine settings shared by compare_vllm.py (given identically to every contender)."""
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--max-num-seqs", type=int, default=128, help="vLLM's CPU default")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048, help="vLLM's CPU default")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="model folder")
    parser.add_argument("--served-model-name", default="model")
    parser.add_argument("--json", action="store_true", help="print one JSON line per level")
    add_engine_arguments(parser)
    add_load_arguments(parser)
    args = parser.parse_args(argv)
    cpu_env.apply_defaults(offline=False)
    summaries = asyncio.run(run(args))
    prompts = build_prompts(args.num_prompts, seed=args.seed)
    print(f"engine-direct: prompts digest {prompts_digest(prompts)}")
    print(format_table(summaries))
    if args.json:
        for s in summaries:
            print("JSON " + json.dumps(asdict(s)))


if __name__ == "__main__":
    main()
