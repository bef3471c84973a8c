"""NF4 artifact: verified manifest, bitsandbytes 4-bit weights saved pre-quantized, loads and generates."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open

from core.artifact import verify_artifact


def test_nf4_artifact_verifies_with_quality(nf4_artifact: Path) -> None:
    manifest = verify_artifact(nf4_artifact)
    assert manifest.kind == "nf4"
    assert manifest.parameters["double_quant"] is True
    assert manifest.quality.perplexity is not None and math.isfinite(manifest.quality.perplexity)
    assert manifest.quality.mean_kl is not None  # bounded against RTN's in test_quality.py


def test_nf4_weights_are_stored_4bit(nf4_artifact: Path) -> None:
    quant = json.loads((nf4_artifact / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "bitsandbytes"
    assert (
        quant["load_in_4bit"] and quant["bnb_4bit_quant_type"] == "nf4" and quant["bnb_4bit_use_double_quant"]
    )
    with safe_open(str(nf4_artifact / "model.safetensors"), "pt") as handle:
        weight = handle.get_tensor("model.layers.0.mlp.down_proj.weight")
        keys = set(handle.keys())
    assert weight.dtype == torch.uint8 and weight.numel() == 128 * 256 // 2  # two 4-bit codes per byte
    assert "model.layers.0.mlp.down_proj.weight.quant_state.bitsandbytes__nf4" in keys
    assert "model.layers.0.mlp.down_proj.weight.nested_absmax" in keys  # double quantization


def test_nf4_loads_in_transformers_and_generates(nf4_artifact: Path) -> None:
    from bitsandbytes.nn import Linear4bit

    from core.models import load_causal_lm

    model = load_causal_lm(nf4_artifact, device_map="cpu")
    assert isinstance(model.model.layers[0].mlp.down_proj, Linear4bit)
    out = model.generate(torch.tensor([[1, 40, 41, 42]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 8)
