"""Fixtures of the toolchain tests (quant environment): artifacts made once per session on the tiny model.

Settings are small (8 calibration samples of 64 tokens, 8 evaluation samples) so the suite stays fast on
two CPU cores; group size 32 gives several groups per row of the tiny model's 128/256-wide layers.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from core.quality import EvalConfig
from quantize.config import CalibrationConfig

if TYPE_CHECKING:
    import torch

CALIBRATION = CalibrationConfig(num_samples=8, max_seq_len=64)
EVAL = EvalConfig(eval_samples=8, eval_seq_len=64)
GROUP_SIZE = 32
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an artifact's single `model.safetensors`, by name."""
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118


@pytest.fixture(scope="session")
def artifacts_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="session")
def awq_artifact(tiny_model_dir: Path, artifacts_root: Path) -> Path:
    from quantize import api
    from quantize.config import AwqConfig

    out = artifacts_root / "awq"
    config = AwqConfig(group_size=GROUP_SIZE, calibration=CALIBRATION)
    api.quantize(tiny_model_dir, out, config, eval_config=EVAL)
    return out


@pytest.fixture(scope="session")
def gptq_artifact(tiny_model_dir: Path, artifacts_root: Path) -> Path:
    from quantize import api
    from quantize.config import GptqConfig

    out = artifacts_root / "gptq"
    config = GptqConfig(group_size=GROUP_SIZE, calibration=CALIBRATION)
    api.quantize(tiny_model_dir, out, config, eval_config=EVAL)
    return out


@pytest.fixture(scope="session")
def awq_classic_artifact(tiny_model_dir: Path, artifacts_root: Path) -> Path:
    """AWQ in the classic AutoAWQ GEMM format (gptqmodel)."""
    from quantize import api
    from quantize.config import AwqConfig

    out = artifacts_root / "awq-classic"
    config = AwqConfig(group_size=GROUP_SIZE, calibration=CALIBRATION, format="awq")
    api.quantize(tiny_model_dir, out, config, eval_config=EVAL)
    return out


@pytest.fixture(scope="session")
def gptq_classic_artifact(tiny_model_dir: Path, artifacts_root: Path) -> Path:
    """GPTQ in the classic AutoGPTQ format (gptqmodel)."""
    from quantize import api
    from quantize.config import GptqConfig

    out = artifacts_root / "gptq-classic"
    config = GptqConfig(group_size=GROUP_SIZE, calibration=CALIBRATION, format="gptq")
    api.quantize(tiny_model_dir, out, config, eval_config=EVAL)
    return out


@pytest.fixture(scope="session")
def rtn_artifact(tiny_model_dir: Path, artifacts_root: Path) -> Path:
    from quantize import api
    from quantize.config import RtnConfig

    out = artifacts_root / "rtn"
    api.quantize(tiny_model_dir, out, RtnConfig(group_size=GROUP_SIZE), eval_config=EVAL)
    return out


@pytest.fixture(scope="session")
def nf4_artifact(tiny_model_dir: Path, artifacts_root: Path) -> Path:
    from quantize import api
    from quantize.config import Nf4Config

    out = artifacts_root / "nf4"
    api.quantize(tiny_model_dir, out, Nf4Config(), eval_config=EVAL)
    return out


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
