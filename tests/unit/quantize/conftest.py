"""Fixtures of the toolchain tests (quant environment): artifacts made once per session on tiny models.

The weight-quantization artifacts are made from `outlier_model_dir`, the tiny model given the activation
outliers of trained LLMs without changing what it computes (see there), so that the quality comparisons of
AWQ and GPTQ with round-to-nearest mean something. Settings stay small for two CPU cores: 32 calibration
samples of 128 tokens (GPTQ's Hessians of the 256-wide layers need a few thousand tokens), 8 evaluation
samples; group size 32 gives several groups per row of the tiny model's 128/256-wide layers.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from core.quality import EvalConfig
from quantize.config import (
    AwqConfig,
    CalibrationConfig,
    GptqConfig,
    MethodConfig,
    Nf4Config,
    RtnConfig,
)

if TYPE_CHECKING:
    import torch

CALIBRATION = CalibrationConfig(num_samples=32, max_seq_len=128)
EVAL = EvalConfig(eval_samples=8, eval_seq_len=64)
GROUP_SIZE = 32
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
OUTLIER_CHANNELS = (5, 37, 69, 101)  # one in each group of 32 of the 128 hidden channels
OUTLIER_SCALE = 8.0  # a power of two: scaling by it is exact, so the logits stay bit for bit the same


def checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an artifact's single `model.safetensors`, by name."""
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118


@pytest.fixture(scope="session")
def outlier_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with the activation outliers of trained LLMs (a few hidden channels several times
    larger than the rest, LLM.int8()/SmoothQuant): each RMSNorm's gain is multiplied by `OUTLIER_SCALE` on
    `OUTLIER_CHANNELS` and the matching input columns of the Linear layers it feeds are divided by it, so the
    model computes exactly what the tiny model computes. Random weights alone have no such structure, and
    on them AWQ and RTN trade places from one group size to the next; here, as in real models, RTN spends
    the same grid on the small, highly activated weight columns as on the rest, while AWQ and GPTQ weigh
    weights by their activations."""
    import torch

    from core.models import load_causal_lm, load_tokenizer

    out = tmp_path_factory.mktemp("models") / "tiny-with-outliers"
    model = load_causal_lm(tiny_model_dir)
    channels = list(OUTLIER_CHANNELS)
    with torch.no_grad():
        for layer in model.model.layers:
            attention, mlp = layer.self_attn, layer.mlp
            for norm, fed in (
                (layer.input_layernorm, (attention.q_proj, attention.k_proj, attention.v_proj)),
                (layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj)),
            ):
                norm.weight[channels] *= OUTLIER_SCALE
                for linear in fed:
                    linear.weight[:, channels] /= OUTLIER_SCALE
    model.save_pretrained(out)
    load_tokenizer(tiny_model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def artifacts_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("artifacts")


def _quantized(model: Path, out: Path, config: MethodConfig) -> Path:
    from quantize import api

    api.quantize(model, out, config, eval_config=EVAL)
    return out


@pytest.fixture(scope="session")
def awq_artifact(outlier_model_dir: Path, artifacts_root: Path) -> Path:
    config = AwqConfig(group_size=GROUP_SIZE, calibration=CALIBRATION)
    return _quantized(outlier_model_dir, artifacts_root / "awq", config)


@pytest.fixture(scope="session")
def gptq_artifact(outlier_model_dir: Path, artifacts_root: Path) -> Path:
    config = GptqConfig(group_size=GROUP_SIZE, calibration=CALIBRATION)
    return _quantized(outlier_model_dir, artifacts_root / "gptq", config)


@pytest.fixture(scope="session")
def awq_classic_artifact(outlier_model_dir: Path, artifacts_root: Path) -> Path:
    """AWQ in the classic AutoAWQ GEMM format (gptqmodel)."""
    config = AwqConfig(group_size=GROUP_SIZE, calibration=CALIBRATION, format="awq")
    return _quantized(outlier_model_dir, artifacts_root / "awq-classic", config)


@pytest.fixture(scope="session")
def gptq_classic_artifact(outlier_model_dir: Path, artifacts_root: Path) -> Path:
    """GPTQ in the classic AutoGPTQ format (gptqmodel)."""
    config = GptqConfig(group_size=GROUP_SIZE, calibration=CALIBRATION, format="gptq")
    return _quantized(outlier_model_dir, artifacts_root / "gptq-classic", config)


@pytest.fixture(scope="session")
def rtn_artifact(outlier_model_dir: Path, artifacts_root: Path) -> Path:
    """Round-to-nearest on AWQ's grid (asymmetric groups)."""
    return _quantized(outlier_model_dir, artifacts_root / "rtn", RtnConfig(group_size=GROUP_SIZE))


@pytest.fixture(scope="session")
def rtn_symmetric_artifact(outlier_model_dir: Path, artifacts_root: Path) -> Path:
    """Round-to-nearest on GPTQ's grid (symmetric groups)."""
    config = RtnConfig(group_size=GROUP_SIZE, symmetric=True)
    return _quantized(outlier_model_dir, artifacts_root / "rtn-symmetric", config)


@pytest.fixture(scope="session")
def nf4_artifact(outlier_model_dir: Path, artifacts_root: Path) -> Path:
    return _quantized(outlier_model_dir, artifacts_root / "nf4", Nf4Config())


def build_adapter(base: Path, out: Path, *, seed: int, rank: int) -> Path:
    """A random-init PEFT LoRA adapter on `base`; B is non-zero (PEFT would start it at zero), so the
    adapter changes the model's outputs."""
    import torch
    from peft import LoraConfig, get_peft_model

    from core.models import load_causal_lm

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0)
    model = get_peft_model(load_causal_lm(base, dtype=torch.float32), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return (
        build_adapter(tiny_model_dir, root / "a", seed=1, rank=4),
        build_adapter(tiny_model_dir, root / "b", seed=2, rank=8),
    )
