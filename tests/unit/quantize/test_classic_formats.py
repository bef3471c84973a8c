"""`--format awq|gptq`: the classic AutoAWQ GEMM / AutoGPTQ checkpoints written by gptqmodel.

Checked here: verified manifests that record the format, real packed 4-bit tensors (`qweight`, `qzeros`,
`scales`; at most 16 levels per group), and that transformers (through gptqmodel's CPU kernels) computes with
exactly the dequantized grid and generates.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from core.artifact import verify_artifact
from core.errors import ConfigError
from quantize.config import AwqConfig, GptqConfig, validated
from tests.unit.quantize.conftest import CALIBRATION, GROUP_SIZE, LINEARS, checkpoint_tensors

FORMATS = ["awq", "gptq"]
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ GEMM: nibble j of a word holds column AWQ_PACK_ORDER[j]


@pytest.fixture(params=FORMATS)
def artifact(request: pytest.FixtureRequest) -> tuple[str, Path]:
    return request.param, request.getfixturevalue(f"{request.param}_classic_artifact")


def _unpack_columns(packed: torch.Tensor) -> torch.Tensor:
    """int32 [rows, n] -> 4-bit codes [rows, 8n]: nibble j (from the low end) of word k is column 8k + j."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    return ((packed.unsqueeze(-1) >> shifts) & 0xF).reshape(packed.shape[0], -1)


def _dequantize(tensors: dict[str, torch.Tensor], prefix: str, fmt: str) -> torch.Tensor:
    """The [out, in] weight the checkpoint encodes: (code - zero) * scale per group of input channels.
    gptq: `qweight` [in/8, out] packed along inputs, `qzeros` stores zero - 1 (AutoGPTQ v1);
    awq: `qweight` [in, out/8] and `qzeros` packed along outputs in AutoAWQ's interleaved order."""
    qweight, qzeros = tensors[f"{prefix}.qweight"], tensors[f"{prefix}.qzeros"]
    if fmt == "gptq":
        codes, zeros = _unpack_columns(qweight.T.contiguous()).T, _unpack_columns(qzeros) + 1
    else:
        order = torch.argsort(torch.tensor(AWQ_PACK_ORDER))

        def unpack(packed: torch.Tensor) -> torch.Tensor:
            codes = _unpack_columns(packed)
            return codes.reshape(codes.shape[0], -1, 8)[:, :, order].reshape(codes.shape[0], -1)

        codes, zeros = unpack(qweight), unpack(qzeros)
    scales = tensors[f"{prefix}.scales"].float().repeat_interleave(GROUP_SIZE, dim=0)
    return ((codes.float() - zeros.float().repeat_interleave(GROUP_SIZE, dim=0)) * scales).T


def test_artifact_verifies_and_records_format(artifact: tuple[str, Path], outlier_model_dir: Path) -> None:
    fmt, folder = artifact
    manifest = verify_artifact(folder)
    assert manifest.kind == fmt and manifest.parameters["format"] == fmt
    assert manifest.parameters["bits"] == 4 and manifest.parameters["group_size"] == GROUP_SIZE
    assert manifest.source is not None and manifest.source.path == str(outlier_model_dir)
    assert manifest.data is not None and manifest.data.num_samples == CALIBRATION.num_samples
    assert "gptqmodel" in manifest.tool_versions
    quality = manifest.quality
    for value in (quality.perplexity, quality.perplexity_source, quality.mean_kl, quality.top1_agreement):
        assert value is not None and math.isfinite(value)


def test_config_declares_the_classic_format(artifact: tuple[str, Path]) -> None:
    fmt, folder = artifact
    quant = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == fmt
    assert (quant["bits"], quant["group_size"], quant["desc_act"]) == (4, GROUP_SIZE, False)
    if fmt == "awq":
        assert quant["version"] == "gemm" and quant["zero_point"] is True  # asymmetric, like the default AWQ
    else:
        assert quant["checkpoint_format"] == "gptq" and quant["sym"] is True


def test_weights_are_packed_4bit_with_at_most_16_levels_per_group(artifact: tuple[str, Path]) -> None:
    fmt, folder = artifact
    tensors = checkpoint_tensors(folder)
    prefixes = sorted(k.removesuffix(".qweight") for k in tensors if k.endswith(".qweight"))
    assert len(prefixes) == 2 * len(LINEARS)  # every Linear of both layers, lm_head excluded
    assert not any(f"{p}.weight" in tensors for p in prefixes)  # no full-precision copy left behind
    for prefix in prefixes:
        assert (
            tensors[f"{prefix}.qweight"].dtype == torch.int32
            and tensors[f"{prefix}.qzeros"].dtype == torch.int32
        )
        if fmt == "gptq":  # no activation reordering: input channel i belongs to group i // GROUP_SIZE
            g_idx = tensors[f"{prefix}.g_idx"]
            assert torch.equal(g_idx, torch.arange(len(g_idx), dtype=g_idx.dtype) // GROUP_SIZE)
        weight = _dequantize(tensors, prefix, fmt)
        out_features, in_features = weight.shape
        assert tensors[f"{prefix}.qweight"].numel() * 8 == out_features * in_features  # 4 bits per weight
        groups = weight.reshape(out_features, in_features // GROUP_SIZE, GROUP_SIZE).reshape(-1, GROUP_SIZE)
        distinct = max(len(torch.unique(group)) for group in groups)
        assert distinct <= 16, f"{prefix}: {distinct} distinct values in a group"


def test_transformers_computes_with_the_packed_grid_and_generates(artifact: tuple[str, Path]) -> None:
    from core.models import load_causal_lm

    fmt, folder = artifact
    model = load_causal_lm(folder, device_map="cpu")
    layer = model.model.layers[1].mlp.down_proj
    assert type(layer).__module__.startswith("gptqmodel.")  # the quantized kernel, not a dequantized Linear
    weight = _dequantize(checkpoint_tensors(folder), "model.layers.1.mlp.down_proj", fmt)
    with torch.no_grad():
        computed = layer(torch.eye(weight.shape[1], dtype=model.dtype)).T.float()
    # Equal up to 16-bit rounding (kernels may fold zero * scale first): far below one quantization step
    # (about max|w| / 8), which any mistake in the unpacking order would be off by.
    torch.testing.assert_close(computed, weight, rtol=0, atol=weight.abs().max().item() * 2**-6)
    out = model.generate(torch.tensor([[1, 40, 41, 42]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 8)


@pytest.mark.parametrize(
    ("model", "values", "fragment"),
    [
        (AwqConfig, {"format": "gptq"}, "Input should be 'compressed-tensors' or 'awq'"),
        (AwqConfig, {"format": "awq", "bits": 8}, "format 'awq' stores 4-bit weights only (got 8 bits)"),
        (AwqConfig, {"format": "awq", "n_grid": 10}, "always uses duo scaling and a 20-point grid"),
        (GptqConfig, {"format": "awq"}, "Input should be 'compressed-tensors' or 'gptq'"),
        (GptqConfig, {"format": "gptq", "block_size": 64}, "always quantizes blocks of 128 columns"),
    ],
)
def test_bad_format_combinations_are_refused(
    model: type[AwqConfig | GptqConfig], values: dict[str, object], fragment: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        validated(model, **values)
