"""End to end: tensor parallelism on CPU (`--tensor-parallel-size 2`, one core per worker) splits the model
across two vLLM workers and still computes the model transformers computes.

In the default suite (one server start, ~45 s on 2 cores). The reference is the same model run by
transformers in this process, both in float32 (vLLM's `auto` would pick bf16 on CPU and blur the
comparison). Greedy texts are not compared: the random tiny model has near-ties that a different summation
order (TP's all-reduce) may flip, which says nothing about correctness. Instead, at several positions along
transformers' greedy continuation, the server's top-5 next-token log-probabilities must equal transformers'
to 1e-3 (a wrong split of any layer would change them by orders more).
"""

from __future__ import annotations

from pathlib import Path

import openai
import torch

from core.models import load_causal_lm, load_tokenizer
from tests.support.server import start_server

PROMPTS = ["The answer is", "Once upon a time", "a"]
CONTINUATION = 8
POSITIONS = (0, 4, 8)  # tokens of the continuation appended to the prompt before asking for the next one
TOP = 5


def _reference(model_dir: Path) -> list[tuple[list[int], list[float]]]:
    """(prompt ids, transformers' top-5 next-token log-probabilities) for every prompt and position."""
    tokenizer = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir, dtype=torch.float32).eval()
    cases = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, max_new_tokens=CONTINUATION, min_new_tokens=CONTINUATION, do_sample=False
            )
            for k in POSITIONS:
                prefix = out[:, : ids.shape[1] + k]
                logprobs = torch.log_softmax(model(prefix).logits[0, -1].float(), dim=-1)
                cases.append((prefix[0].tolist(), logprobs.topk(TOP).values.tolist()))
    return cases


def test_tensor_parallel_2_computes_what_transformers_computes(tiny_model_dir: Path, tmp_path: Path) -> None:
    cases = _reference(tiny_model_dir)
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    with start_server(
        tiny_model_dir, "--tensor-parallel-size", "2", "--dtype", "float32", env=env, log_dir=tmp_path
    ) as split:
        client = openai.OpenAI(base_url=split.openai_url, api_key="unused", max_retries=0, timeout=120)
        for prompt_ids, expected in cases:
            reply = client.completions.create(
                model=tiny_model_dir.name, prompt=prompt_ids, max_tokens=1, temperature=0, logprobs=TOP
            )
            logprobs = reply.choices[0].logprobs
            assert logprobs is not None and logprobs.top_logprobs is not None
            top = sorted(logprobs.top_logprobs[0].values(), reverse=True)
            # token strings can collide (several byte-level tokens decode to the same text): compare what
            # survives, always including the most likely token's log-probability
            assert top and abs(top[0] - expected[0]) < 1e-3, (prompt_ids, top, expected)
            if len(top) == TOP:
                assert all(abs(a - b) < 1e-3 for a, b in zip(top, expected, strict=True)), (top, expected)
        assert "tensor_parallel_size=2" in split.log()
