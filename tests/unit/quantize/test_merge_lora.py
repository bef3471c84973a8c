"""LoRA merge: the merged model computes what the base with the (weighted) adapters computes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.artifact import verify_artifact
from core.errors import ConfigError, ModelLoadError
from core.models import load_causal_lm
from quantize import api
from quantize.config import MergeLoraConfig
from tests.unit.quantize.conftest import EVAL

INPUT = torch.tensor([[1, 17, 300, 42, 1000, 7, 99, 512]])


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT).logits


def test_single_adapter_merge_matches_adapter_model(
    tiny_model_dir: Path, adapters: tuple[Path, Path], tmp_path: Path
) -> None:
    from peft import PeftModel

    out = tmp_path / "merged"
    api.merge_lora(tiny_model_dir, out, MergeLoraConfig(adapters=[adapters[0]]), eval_config=EVAL)
    manifest = verify_artifact(out)
    assert manifest.kind == "merged" and manifest.quality.mean_kl is not None
    merged = _logits(load_causal_lm(out, dtype=torch.float32))
    reference = _logits(
        PeftModel.from_pretrained(load_causal_lm(tiny_model_dir, dtype=torch.float32), adapters[0])
    )
    base = _logits(load_causal_lm(tiny_model_dir, dtype=torch.float32))
    assert (reference - base).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(merged, reference, rtol=0, atol=1e-4)


def test_weighted_merge_of_two_adapters(
    tiny_model_dir: Path, adapters: tuple[Path, Path], tmp_path: Path
) -> None:
    """W + 0.5·ΔW_a + 1.5·ΔW_b, checked against PEFT running both adapters at once with scaled strength."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    out = tmp_path / "merged"
    config = MergeLoraConfig(adapters=list(adapters), weights=[0.5, 1.5])
    api.merge_lora(tiny_model_dir, out, config, eval_config=EVAL)
    verify_artifact(out)
    merged = _logits(load_causal_lm(out, dtype=torch.float32))

    model = PeftModel.from_pretrained(load_causal_lm(tiny_model_dir, dtype=torch.float32), adapters[0], "a")
    model.load_adapter(adapters[1], adapter_name="b")
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.scaling["a"] *= 0.5
            module.scaling["b"] *= 1.5
    model.base_model.set_adapter(["a", "b"])
    torch.testing.assert_close(merged, _logits(model), rtol=0, atol=1e-4)


def test_quantized_base_is_refused_unless_forced(
    nf4_artifact: Path, adapters: tuple[Path, Path], tmp_path: Path
) -> None:
    out = tmp_path / "merged"
    with pytest.raises(ConfigError, match=r"quantized \(bitsandbytes\).*--force"):
        api.merge_lora(nf4_artifact, out, MergeLoraConfig(adapters=[adapters[0]]), eval_config=EVAL)
    assert not out.exists()
    api.merge_lora(nf4_artifact, out, MergeLoraConfig(adapters=[adapters[0]], force=True), eval_config=EVAL)
    manifest = verify_artifact(out)
    assert manifest.parameters["base_quantization"] == "bitsandbytes"
    assert "quantization_config" not in (out / "config.json").read_text()


def test_not_an_adapter_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"adapter_config\.json is missing"):
        api.merge_lora(tiny_model_dir, tmp_path / "out", MergeLoraConfig(adapters=[tmp_path]))
    assert not (tmp_path / "out").exists()
