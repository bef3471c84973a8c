"""`serve.vllm_plugin.lora_fix.skip_no_lora_rows` on vLLM's CPU LoRA ops, tensor by tensor."""

from __future__ import annotations

import pytest
import torch

from serve.vllm_plugin import lora_fix as vllm_plugin

lora_ops = pytest.importorskip("vllm.lora.ops.torch_ops.lora_ops")


def _original(name: str):  # type: ignore[no-untyped-def]
    op = getattr(lora_ops, name)
    return getattr(op, "__wrapped__", op)


def test_fix_installs_once_and_keeps_the_original() -> None:
    assert vllm_plugin.fix_lora_no_adapter_rows()
    for name in vllm_plugin.BGMV_OPS:
        assert getattr(getattr(lora_ops, name), vllm_plugin.FIXED_MARK, False)
    assert vllm_plugin.fix_lora_no_adapter_rows()  # idempotent: no double wrapping
    assert not hasattr(_original("bgmv_shrink"), "__wrapped__")


@pytest.mark.parametrize("add_inputs", [True, False])
def test_expand_leaves_no_lora_rows_alone_and_valid_rows_bit_identical(add_inputs: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    weights = torch.randn(3, 1, 16, 4, generator=gen)  # 3 slots, out 16, rank 4
    inputs = torch.randn(5, 4, generator=gen)
    indices = torch.tensor([0, -1, 2, -1, 1])
    start = torch.randn(5, 16, generator=gen)
    fixed_out, original_out = start.clone(), start.clone()
    vllm_plugin.skip_no_lora_rows(_original("bgmv_expand"))(inputs, weights, fixed_out, indices, add_inputs)
    _original("bgmv_expand")(inputs, weights, original_out, indices, add_inputs)
    valid = indices >= 0
    assert torch.equal(fixed_out[valid], original_out[valid])
    expected_no_lora = start[~valid] if add_inputs else torch.zeros_like(start[~valid])
    assert torch.equal(fixed_out[~valid], expected_no_lora)
    assert not torch.equal(original_out[~valid], expected_no_lora)  # the upstream bug, for contrast


def test_shrink_and_expand_slice_zero_the_no_lora_delta() -> None:
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(2, 1, 4, 16, generator=gen)  # 2 slots, rank 4, hidden 16
    b = torch.randn(2, 1, 8, 4, generator=gen)
    x = torch.randn(3, 16, generator=gen)
    indices = torch.tensor([1, -1, 0])
    buffer = torch.full((3, 4), 7.0)
    vllm_plugin.skip_no_lora_rows(_original("bgmv_shrink"))(x, a, buffer, indices, 0.5)
    assert torch.equal(buffer[1], torch.zeros(4))
    expected = torch.full((3, 4), 7.0)
    _original("bgmv_shrink")(x, a, expected, indices, 0.5)
    assert torch.equal(buffer[[0, 2]], expected[[0, 2]])
    y = torch.ones(3, 20)
    vllm_plugin.skip_no_lora_rows(_original("bgmv_expand_slice"))(buffer, b, y, indices, 4, 8, True)
    assert torch.equal(y[1], torch.ones(20))
    assert not torch.equal(y[0, 4:12], torch.ones(8))
