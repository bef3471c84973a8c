"""Fix 4 of the vLLM plugin (serve/vllm_plugin/nf4.py): bitsandbytes 4-bit weights dequantized at load.

Here on synthetic tensors laid out as bitsandbytes saves them (against an independent per-element formula)
and the loader's grouping; against bitsandbytes' own `dequantize_4bit` through transformers, end to end on a
real `quantize nf4` artifact: tests/e2e/test_quantized_serving.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from core.errors import StackError
from serve.vllm_plugin import nf4

OUT, IN, BLOCK, NESTED_BLOCK = 16, 48, 64, 4  # 768 values: 12 blocks, 3 nested blocks


def _bnb_tensors(seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The tensors bitsandbytes saves for one double-quantized 4-bit weight `w.weight`, and its value."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (OUT * IN,), generator=g)
    quant_map = torch.sort(torch.rand(16, generator=g) * 2 - 1).values
    blocks = OUT * IN // BLOCK
    absmax_codes = torch.randint(0, 256, (blocks,), generator=g, dtype=torch.uint8)
    nested_map = torch.rand(256, generator=g)
    nested_absmax = torch.rand(blocks // NESTED_BLOCK, generator=g) + 0.5
    offset = 0.25
    # independent of the implementation: one element at a time
    expected = torch.empty(OUT * IN)
    for i in range(OUT * IN):
        block = i // BLOCK
        absmax = nested_map[absmax_codes[block].item()] * nested_absmax[block // NESTED_BLOCK] + offset
        expected[i] = quant_map[codes[i]] * absmax
    packed = (codes[0::2] << 4 | codes[1::2]).to(torch.uint8).view(-1, 1)
    state = {"quant_type": "nf4", "blocksize": BLOCK, "dtype": "float32", "shape": [OUT, IN]}
    state.update(nested_blocksize=NESTED_BLOCK, nested_dtype="float32", nested_offset=offset)
    state_bytes = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)
    tensors = {
        "w.weight": packed,
        "w.weight.absmax": absmax_codes,
        "w.weight.quant_map": quant_map,
        "w.weight.nested_absmax": nested_absmax,
        "w.weight.nested_quant_map": nested_map,
        "w.weight.quant_state.bitsandbytes__nf4": state_bytes,
    }
    return tensors, expected.view(OUT, IN)


@pytest.mark.parametrize("order", ["saved", "reversed"])
def test_groups_are_dequantized_in_any_order_and_other_tensors_pass(order: str) -> None:
    tensors, expected = _bnb_tensors()
    norm = torch.ones(IN)
    items = [("norm.weight", norm), *tensors.items()]
    if order == "reversed":
        items.reverse()
    out = dict(nf4.dequantized_weights(items, torch.bfloat16))
    assert set(out) == {"norm.weight", "w.weight"}
    assert out["norm.weight"] is norm
    assert out["w.weight"].dtype == torch.bfloat16
    torch.testing.assert_close(out["w.weight"], expected.to(torch.bfloat16), rtol=0, atol=0)
    exact = dict(nf4.dequantized_weights(tensors.items(), torch.float32))["w.weight"]
    torch.testing.assert_close(exact, expected, rtol=1e-6, atol=1e-7)


def test_a_missing_part_is_an_error() -> None:
    tensors, _ = _bnb_tensors()
    del tensors["w.weight.nested_absmax"]
    with pytest.raises(ValueError, match="incomplete bitsandbytes tensors"):
        list(nf4.dequantized_weights(tensors.items(), torch.float32))


def _config(tmp_path: Path, quant: dict | None) -> Path:
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": quant} if quant else {}))
    return tmp_path


def test_engine_overrides(tmp_path: Path) -> None:
    assert nf4.engine_overrides(_config(tmp_path, None)) == {}
    assert nf4.engine_overrides(_config(tmp_path, {"quant_method": "awq"})) == {}
    bnb = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_storage": "uint8"}
    overrides = nf4.engine_overrides(_config(tmp_path, bnb))
    assert overrides == {"load_format": nf4.LOAD_FORMAT, "hf_overrides": {"quantization_config": None}}
    with pytest.raises(StackError, match="8-bit"):
        nf4.engine_overrides(_config(tmp_path, {"quant_method": "bitsandbytes", "load_in_8bit": True}))
    with pytest.raises(StackError, match="bfloat16"):
        nf4.engine_overrides(_config(tmp_path, {**bnb, "bnb_4bit_quant_storage": "bfloat16"}))


def test_loader_is_registered_with_vllm() -> None:
    from vllm.model_executor.model_loader import _LOAD_FORMAT_TO_MODEL_LOADER

    nf4.register_loader()
    nf4.register_loader()
    loader = _LOAD_FORMAT_TO_MODEL_LOADER[nf4.LOAD_FORMAT]
    assert loader.__name__ == "NF4DequantizingLoader"
