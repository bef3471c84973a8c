"""`quantize distill`: one loop (train.distill) behind the toolchain's command; the distilled student beats
the same student trained on hard labels only (same steps, data and order), as the command reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.artifact import verify_artifact
from tests.unit.quantize.conftest import EVAL


@pytest.fixture(scope="module")
def teacher_and_data(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path, Path]:
    """A teacher whose outputs the data reflects, without training one (too slow for this suite): the tiny
    model with a sharpened output layer (x12 logits) and text sampled from it. Its soft targets carry more
    per token than the sampled hard labels; the margin is small (about 0.02 nats here) but deterministic."""
    import torch

    from core.models import load_causal_lm, load_tokenizer

    root = tmp_path_factory.mktemp("distill")
    teacher = load_causal_lm(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(12.0)
    tokenizer = load_tokenizer(tiny_model_dir)
    teacher.save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    torch.manual_seed(0)
    prompts = torch.randint(3, len(tokenizer), (48, 1))
    with torch.no_grad():
        samples = teacher.generate(prompts, do_sample=True, top_k=0, max_new_tokens=40, min_new_tokens=40)
    texts = tokenizer.batch_decode(samples)
    for name, part in (("train.jsonl", texts[:40]), ("heldout.jsonl", texts[40:])):
        (root / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in part))
    return root / "teacher", root / "train.jsonl", root / "heldout.jsonl"


def test_distilled_student_beats_hard_labels(
    teacher_and_data: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    from quantize import api
    from train.config import LoopConfig, OptimConfig
    from train.distill import DistillConfig

    teacher, train_data, heldout = teacher_and_data
    config = DistillConfig(
        teacher=teacher,
        student_layers=1,
        data=str(train_data),
        eval_data=str(heldout),
        max_length=48,
        compare_hard_labels=True,
        loop=LoopConfig(
            max_steps=12, batch_size=8, optim=OptimConfig(lr=2e-3), eval_every=0, checkpoint_every=0,
            progress=False,
        ),
    )  # fmt: skip
    out = tmp_path / "student"
    manifest = api.distill(config, out, eval_config=EVAL)
    assert verify_artifact(out).kind == "distilled"
    losses = manifest.quality.extra
    assert losses["heldout_loss"] < losses["heldout_loss_initial"]
    assert losses["heldout_loss"] < losses["heldout_loss_hard_labels"]
    assert manifest.parameters["result"]["student_layers"] == 1
    assert manifest.quality.mean_kl is not None  # evaluated against the teacher
