"""The server (real vLLM engine) loads the toolchain's AWQ and GPTQ artifacts, in compressed-tensors and in
the classic awq/gptq formats (`--format`, written by gptqmodel), and answers chat requests.

Artifacts are made by the real `quantize` command in the toolchain environment (`LLMSTACK_QUANT_PYTHON`,
exported by the Makefile), exactly as a user runs it; this module runs in the serving environment.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from core.artifact import verify_artifact
from tests.support.server import RunningServer, start_server

REPO_ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--num-samples", "8", "--max-seq-len", "64", "--eval-samples", "4", "--eval-seq-len", "32"]
# AWQ with the default group size (128: one group per row of the 128-wide layers), GPTQ with 32 (4 groups).
ARTIFACTS = {
    "awq": ["--group-size", "128"],
    "gptq": ["--group-size", "32"],
    "awq-classic": ["--group-size", "32", "--format", "awq"],
    "gptq-classic": ["--group-size", "32", "--format", "gptq"],
    "nf4": [],
}
SERVED = ["awq", "gptq", "awq-classic", "gptq-classic"]
# What vLLM logs when it takes each artifact's quantized path (its engine config line names the method).
ENGINE_LOG_MARKERS = {
    "awq": ("compressed-tensors", "compressed_tensors"),
    "gptq": ("compressed-tensors", "compressed_tensors"),
    "awq-classic": ("quantization=awq",),
    "gptq-classic": ("quantization=auto_gptq",),
}
PROMPT = "Explain in one sentence what the Python statement 'import' does and when a module is loaded."


def _quantize(name: str, model: Path, out: Path) -> Path:
    """`name` is a key of ARTIFACTS: the method, with `-classic` for its gptqmodel format."""
    python = os.environ.get("LLMSTACK_QUANT_PYTHON")
    if not python:
        pytest.skip(
            "LLMSTACK_QUANT_PYTHON is unset: the toolchain environment is needed (run via `make test`)"
        )
    method = name.removesuffix("-classic")
    extra = SMALL if method != "nf4" else SMALL[4:]
    command = [python, "-m", "quantize.cli", method, "--model", str(model), "--output", str(out), *extra]
    done = subprocess.run(command + ARTIFACTS[name], cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def artifacts(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quantized")
    return {name: _quantize(name, tiny_model_dir, root / name) for name in SERVED}


@pytest.fixture(scope="module", params=SERVED)
def server(
    request: pytest.FixtureRequest, artifacts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, RunningServer]]:
    artifact = artifacts[request.param]
    with start_server(artifact, log_dir=tmp_path_factory.mktemp(f"serve-{request.param}")) as running:
        yield request.param, running


def test_server_answers_chat_with_quantized_artifact(
    server: tuple[str, RunningServer], artifacts: dict[str, Path]
) -> None:
    name, running = server
    assert verify_artifact(artifacts[name]).kind == name.removesuffix("-classic")
    client = openai.OpenAI(base_url=running.openai_url, api_key="unused")
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=8, temperature=0
    )
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    assert reply.choices[0].message.content
    log = running.log()
    assert any(marker in log for marker in ENGINE_LOG_MARKERS[name]), (
        "the engine did not load the quantized path"
    )


@pytest.mark.gpu
def test_server_loads_nf4_artifact(tiny_model_dir: Path, tmp_path: Path) -> None:
    """vLLM's bitsandbytes path needs a CUDA GPU (skipped on CPU; the NF4 artifact is tested in transformers
    by tests/unit/quantize/test_nf4.py)."""
    artifact = _quantize("nf4", tiny_model_dir, tmp_path / "nf4")
    with start_server(artifact, log_dir=tmp_path / "serve") as running:
        client = openai.OpenAI(base_url=running.openai_url, api_key="unused")
        model = client.models.list().data[0].id
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=8, temperature=0
        )
        assert reply.choices[0].message.content
