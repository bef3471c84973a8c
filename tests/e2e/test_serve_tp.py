"""End to end: tensor parallelism on CPU (`--tensor-parallel-size 2`, one core per worker) gives the same
greedy text as one worker.

Slow (about 150 s on 2 shared cores: two servers, the TP=2 one with two spawned workers): run with --run-slow.
"""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from tests.support.server import start_server

PROMPTS = ["The answer is", "Once upon a time", "a"]


def _greedy_texts(url: str, model: str) -> list[str]:
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
    return [
        client.completions.create(model=model, prompt=p, max_tokens=16, temperature=0).choices[0].text
        for p in PROMPTS
    ]


@pytest.mark.slow
def test_tensor_parallel_2_matches_1(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = tiny_model_dir.name
    with start_server(tiny_model_dir, log_dir=tmp_path / "tp1") as single:
        expected = _greedy_texts(single.openai_url, model)
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    with start_server(
        tiny_model_dir, "--tensor-parallel-size", "2", env=env, log_dir=tmp_path / "tp2"
    ) as split:
        assert _greedy_texts(split.openai_url, model) == expected
        assert "tensor_parallel_size=2" in split.log()
