"""AWQ, GPTQ and RTN artifacts: verified manifests, real packed 4-bit weights, measured quality (bounded
against each other in test_quality.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from core.artifact import verify_artifact
from tests.unit.quantize.conftest import CALIBRATION, GROUP_SIZE, LINEARS, checkpoint_tensors

METHODS = ["awq", "gptq", "rtn"]


@pytest.fixture(params=METHODS)
def artifact(request: pytest.FixtureRequest) -> tuple[str, Path]:
    return request.param, request.getfixturevalue(f"{request.param}_artifact")


def _dequantize(tensors: dict[str, torch.Tensor], prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(dequantized weight, per-group scale broadcast to the weight) from the packed checkpoint tensors."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    shape = torch.Size(tensors[f"{prefix}.weight_shape"].tolist())
    q = unpack_from_int32(tensors[f"{prefix}.weight_packed"], 4, shape).float()
    scale = tensors[f"{prefix}.weight_scale"].float().repeat_interleave(GROUP_SIZE, dim=1)
    zp_key = f"{prefix}.weight_zero_point"
    zero = torch.zeros_like(q)
    if zp_key in tensors:
        zp_shape = torch.Size([shape[0], shape[1] // GROUP_SIZE])
        zero = unpack_from_int32(tensors[zp_key], 4, zp_shape, packed_dim=0).float()
        zero = zero.repeat_interleave(GROUP_SIZE, dim=1)
    return (q - zero) * scale, scale


def test_artifact_verifies_and_records_quality(artifact: tuple[str, Path], outlier_model_dir: Path) -> None:
    method, folder = artifact
    manifest = verify_artifact(folder)
    assert manifest.kind == method
    assert manifest.parameters["bits"] == 4 and manifest.parameters["group_size"] == GROUP_SIZE
    assert manifest.source is not None and manifest.source.path == str(outlier_model_dir)
    quality = manifest.quality
    assert quality.eval_data is not None and quality.eval_data.num_tokens
    for value in (quality.perplexity, quality.perplexity_source, quality.mean_kl, quality.top1_agreement):
        assert value is not None and math.isfinite(value)
    if method == "rtn":
        assert manifest.data is None  # data-free
    else:
        assert manifest.data is not None and manifest.data.num_samples == CALIBRATION.num_samples


def test_config_declares_packed_4bit_compressed_tensors(artifact: tuple[str, Path]) -> None:
    method, folder = artifact
    quant = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "compressed-tensors"
    assert quant["format"] == "pack-quantized"
    weights = quant["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["strategy"]) == (4, GROUP_SIZE, "group")
    assert weights["symmetric"] is (method == "gptq")


def test_weights_are_packed_int32_with_at_most_16_levels_per_group(artifact: tuple[str, Path]) -> None:
    _, folder = artifact
    tensors = checkpoint_tensors(folder)
    prefixes = sorted(k.removesuffix(".weight_packed") for k in tensors if k.endswith(".weight_packed"))
    assert len(prefixes) == 2 * len(LINEARS)  # every Linear of both layers, lm_head excluded
    assert not any(f"{p}.weight" in tensors for p in prefixes)  # no full-precision copy left behind
    for prefix in prefixes:
        packed = tensors[f"{prefix}.weight_packed"]
        out_features, in_features = tensors[f"{prefix}.weight_shape"].tolist()
        assert packed.dtype == torch.int32 and packed.shape == (out_features, in_features // 8)
        weight, _ = _dequantize(tensors, prefix)
        groups = weight.reshape(out_features, in_features // GROUP_SIZE, GROUP_SIZE)
        distinct = max(len(torch.unique(group)) for group in groups.reshape(-1, GROUP_SIZE))
        assert distinct <= 16, f"{prefix}: {distinct} distinct values in a group"


def test_transformers_computes_with_the_dequantized_grid(rtn_artifact: Path, outlier_model_dir: Path) -> None:
    """What transformers loads equals our own dequantization of the packed tensors, and RTN rounds each
    source weight to the nearest level (error at most half a step)."""
    from core.models import load_causal_lm

    tensors = checkpoint_tensors(rtn_artifact)
    prefix = "model.layers.1.mlp.down_proj"
    weight, scale = _dequantize(tensors, prefix)
    model = load_causal_lm(rtn_artifact, device_map="cpu")
    layer = model.model.layers[1].mlp.down_proj
    with torch.no_grad():
        model(torch.tensor([[1, 2]]))  # compressed-tensors decompresses on the first forward
        computed = layer(torch.eye(weight.shape[1])).T  # the weight matrix the loaded layer applies
    torch.testing.assert_close(computed.float(), weight, rtol=0, atol=1e-5)
    source = load_causal_lm(outlier_model_dir).state_dict()
    error = (source[f"{prefix}.weight"].float() - weight).abs()
    assert bool((error <= scale / 2 + 1e-6).all())
    assert error.max() > 0


def test_quantized_model_generates_in_transformers(gptq_artifact: Path) -> None:
    from core.models import load_causal_lm

    model = load_causal_lm(gptq_artifact, device_map="cpu")
    out = model.generate(torch.tensor([[1, 40, 41, 42]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 8)
