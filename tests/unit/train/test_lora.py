"""`train lora` end to end on the tiny model: held-out loss goes down; the output is a verified PEFT adapter
artifact that PEFT loads onto the base model and that changes its output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from core.artifact import folder_digest, verify_artifact
from core.errors import ConfigError
from tests.unit.train.test_monitor import tensorboard_events
from train.config import LoraRecipe, load_recipe
from train.lora import train_lora
from train.monitor import TENSORBOARD_DIR

RECIPE = {
    "lora": {"rank": 8, "alpha": 16, "dropout": 0.0},
    "data": {"max_length": 128, "heldout_every": 5},
    "loop": {
        "max_steps": 24,
        "batch_size": 4,
        "eval_every": 8,
        "checkpoint_every": 8,
        "progress": False,
        "optim": {"lr": 3e-3, "warmup_steps": 2},
    },
}


def test_lora_lowers_heldout_loss_and_writes_an_adapter_artifact(
    tiny_model_dir: Path, chat_jsonl: Path, tmp_path: Path
) -> None:
    out = tmp_path / "adapter"
    result = train_lora(tiny_model_dir, chat_jsonl, out, LoraRecipe.model_validate(RECIPE))
    assert result.eval_loss_initial is not None
    assert result.eval_loss < result.eval_loss_initial - 0.5  # held-out conversations got much likelier
    manifest = verify_artifact(out)
    assert manifest.kind == "lora"
    assert manifest.source is not None and manifest.source.digest == folder_digest(tiny_model_dir)
    assert manifest.quality.extra["eval_loss"] == pytest.approx(result.eval_loss)
    assert manifest.data is not None and manifest.data.num_samples == result.train_records == 32
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["peft_type"] == "LORA"
    assert {"train_log.json", "loss_curve.png", "adapter_model.safetensors"} <= {
        p.name for p in out.iterdir()
    }
    scalars, _ = tensorboard_events(tmp_path / "adapter.work" / TENSORBOARD_DIR)  # the default work dir
    assert [step for step, _ in scalars["train/loss"]] == list(range(1, 25))
    assert [step for step, _ in scalars["eval/loss"]] == [0, 8, 16, 24]
    assert result.alerts == []

    from peft import PeftModel

    from core.models import load_causal_lm

    base = load_causal_lm(tiny_model_dir, dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 200, 33]])
    before = base(input_ids=ids).logits
    tuned = PeftModel.from_pretrained(base, out).eval()
    assert not torch.allclose(tuned(input_ids=ids).logits, before, atol=1e-3)


def test_every_shipped_recipe_loads() -> None:
    from train.distill import DistillConfig
    from train.qat import QatRecipe

    recipes = sorted((Path(__file__).parents[3] / "train" / "recipes").glob("*.yaml"))
    assert len(recipes) >= 4
    for path in recipes:
        if path.name == "fsdp.yaml":  # an accelerate config (run by test_multiprocess.py), not a recipe
            from accelerate.commands.config.config_args import load_config_from_file

            accelerate_config = load_config_from_file(str(path))
            assert accelerate_config.distributed_type == "FSDP"
            assert accelerate_config.fsdp_config["fsdp_version"] == 2  # train refuses FSDP1
        elif path.name.startswith("distill"):
            import yaml

            DistillConfig.model_validate({**yaml.safe_load(path.read_text()), "teacher": "model"})
        elif path.name.startswith("qat"):
            load_recipe(path, QatRecipe)
        else:
            load_recipe(path, LoraRecipe)


def test_recipe_errors_are_reported_together(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("lora: {rank: 0, colour: red}\nloop: {batch_size: -1, optim: {lr: 0}}\n")
    with pytest.raises(ConfigError) as info:
        load_recipe(path, LoraRecipe)
    message = str(info.value)
    assert "\n" not in message
    for fragment in ("lora.rank", "lora.colour: Extra inputs", "loop.batch_size", "loop.optim.lr"):
        assert fragment in message
