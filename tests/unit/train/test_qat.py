"""`train qat` on the tiny model: the fake quantizer is compressed-tensors' own grid with straight-through
gradients; the export is the toolchain's compressed-tensors W4A16 layout and transformers computes exactly
what training computed; QAT's KL to the full-precision model is lower than RTN's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.artifact import verify_artifact
from core.models import load_causal_lm
from core.textdata import BUILTIN_CORPUS
from tests.unit.train.test_monitor import tensorboard_events
from train.monitor import TENSORBOARD_DIR
from train.qat import (
    GroupFakeQuant,
    QatRecipe,
    QatResult,
    QatSettings,
    export_compressed,
    fake_quantize_reference,
    fake_quantizers,
    prepare_fake_quant,
    train_qat,
)

REPO_ROOT = Path(__file__).resolve().parents[3]
GROUP = 32  # several groups per row of the tiny model's 128/256-wide layers
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RECIPE = {
    "qat": {"group_size": GROUP, "scale_lr": 3e-3},
    "data": {"max_length": 64, "max_samples": 200},
    "loop": {
        "max_steps": 30,
        "batch_size": 4,
        "eval_every": 15,
        "checkpoint_every": 0,
        "progress": False,
        "optim": {"lr": 3e-5, "warmup_steps": 2},
    },
    "evaluation": {"eval_samples": 16, "eval_seq_len": 64},
}


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118


@pytest.fixture(scope="module")
def qat_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[QatResult, Path]:
    out = tmp_path_factory.mktemp("qat") / "artifact"
    return train_qat(tiny_model_dir, BUILTIN_CORPUS, out, QatRecipe.model_validate(RECIPE)), out


@pytest.mark.parametrize("symmetric", [True, False])
def test_fake_quant_is_compressed_tensors_grid(symmetric: bool) -> None:
    """At initialization and after its parameters moved, the fake quantizer computes what
    compressed-tensors' own `fake_quantize` computes with the same scale and zero point."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    torch.manual_seed(0)
    weight = torch.randn(16, 4 * GROUP) * 0.05
    args = QatSettings(group_size=GROUP, symmetric=symmetric).quantization_args()
    quantizer = GroupFakeQuant(weight, args)
    groups = weight.unflatten(-1, (-1, GROUP))
    scale, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
    torch.testing.assert_close(quantizer(weight), fake_quantize(weight, scale, zero, args), rtol=0, atol=0)
    with torch.no_grad():
        quantizer.log_scale_ratio.add_(0.2 * torch.randn_like(quantizer.log_scale_ratio))
        if quantizer.zero_point is not None:
            quantizer.zero_point.add_(2.0 * torch.randn_like(quantizer.zero_point))
    learned_zero = quantizer.integer_zero_point()
    zero = torch.zeros_like(scale) if learned_zero is None else learned_zero.detach()
    expected = fake_quantize(weight, quantizer.scale().detach(), zero, args)
    torch.testing.assert_close(quantizer(weight), expected, rtol=0, atol=0)
    levels = quantizer(weight).unflatten(-1, (-1, GROUP))
    assert max(len(torch.unique(g)) for g in levels.reshape(-1, GROUP)) <= 16


def test_rounding_passes_gradients_straight_through() -> None:
    torch.manual_seed(0)
    weight = (torch.randn(8, 2 * GROUP) * 0.05).requires_grad_()
    quantizer = GroupFakeQuant(weight, QatSettings(group_size=GROUP, symmetric=True).quantization_args())
    upstream = torch.randn(8, 2 * GROUP)
    (quantizer(weight) * upstream).sum().backward()
    assert weight.grad is not None
    scaled = weight.detach().unflatten(-1, (-1, GROUP)) / quantizer.scale().detach().unsqueeze(-1)
    inside = ((scaled >= -8) & (scaled <= 7)).flatten(-2)
    assert not inside.all()  # symmetric min-max: each group's largest positive weight is clipped at +7
    torch.testing.assert_close(weight.grad, upstream * inside)  # identity inside the grid, zero when clipped
    ratio_grad = quantizer.log_scale_ratio.grad
    assert ratio_grad is not None and torch.isfinite(ratio_grad).all() and ratio_grad.abs().sum() > 0


@pytest.mark.parametrize("symmetric", [True, False])
def test_memory_lean_backward_equals_autograds(symmetric: bool) -> None:
    """The hand-written backward (which keeps only w, s, z) gives autograd's gradients of the plain
    expression, for the weights, the log-scale factors and the zero points, clipped elements included."""
    import copy

    torch.manual_seed(0)
    weight = torch.randn(8, 4 * GROUP) * 0.05
    fused = GroupFakeQuant(weight, QatSettings(group_size=GROUP, symmetric=symmetric).quantization_args())
    with torch.no_grad():
        fused.log_scale_ratio.add_(0.3 * torch.randn_like(fused.log_scale_ratio))  # clip some, widen others
        if fused.zero_point is not None:
            fused.zero_point.add_(2.0 * torch.randn_like(fused.zero_point))
    plain = copy.deepcopy(fused)
    upstream = torch.randn(8, 4 * GROUP)
    w_fused, w_plain = weight.clone().requires_grad_(), weight.clone().requires_grad_()
    out_fused = fused(w_fused)
    (out_fused * upstream).sum().backward()
    out_plain = fake_quantize_reference(
        w_plain, plain.scale(), plain.integer_zero_point(), plain.q_min, plain.q_max
    )
    (out_plain * upstream).sum().backward()
    torch.testing.assert_close(out_fused, out_plain, rtol=0, atol=0)
    # autograd's weight gradient goes through (g * s) / s, the hand-written one is exactly g: fp32 rounding
    torch.testing.assert_close(w_fused.grad, w_plain.grad)
    torch.testing.assert_close(fused.log_scale_ratio.grad, plain.log_scale_ratio.grad)
    if fused.zero_point is not None:
        assert plain.zero_point is not None and plain.zero_point.grad is not None
        assert plain.zero_point.grad.abs().sum() > 0  # some elements were clipped
        torch.testing.assert_close(fused.zero_point.grad, plain.zero_point.grad)


@pytest.mark.parametrize("symmetric", [True, False])
def test_transformers_computes_what_training_computed(
    tiny_model_dir: Path, tmp_path: Path, symmetric: bool
) -> None:
    """Move every trained tensor (weights, scale factors, zero points) as training would, then export: the
    artifact as transformers loads it gives the fake-quantized model's logits exactly (fp32)."""
    model = load_causal_lm(tiny_model_dir, dtype=torch.float32)
    settings = QatSettings(group_size=GROUP, symmetric=symmetric)
    names = prepare_fake_quant(model, settings)
    assert len(names) == 2 * len(LINEARS) and "lm_head" not in names
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in (p for p in model.parameters() if p.requires_grad):
            param.add_(0.05 * param.abs().mean() * torch.randn(param.shape, generator=generator))
        for quantizer in fake_quantizers(model).values():  # move scales and zero points by whole steps
            ratio, zero = quantizer.log_scale_ratio, quantizer.zero_point
            ratio.add_(0.1 * torch.randn(ratio.shape, generator=generator))
            if zero is not None:
                zero.add_(torch.randn(zero.shape, generator=generator))
    ids = torch.tensor([[1, 40, 41, 42, 300, 7, 9, 1000]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    export_compressed(model, tmp_path, settings, torch.float32)
    loaded = load_causal_lm(tmp_path, device_map="cpu")
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_qat_lowers_kl_below_rtn(qat_run: tuple[QatResult, Path]) -> None:
    """The headline: after 30 steps QAT's artifact is closer to the full-precision model than its own
    starting point, round-to-nearest on the same grid (both measured the same way, on held-out text)."""
    result, out = qat_run
    quality = verify_artifact(out).quality
    rtn_kl = quality.extra["rtn_mean_kl"]
    assert quality.mean_kl is not None and rtn_kl > 0
    assert quality.mean_kl < 0.85 * rtn_kl, (quality.mean_kl, rtn_kl)
    assert result.mean_kl == quality.mean_kl and result.rtn_mean_kl == rtn_kl
    assert result.validation_loss_initial is not None
    assert result.validation_loss < result.validation_loss_initial  # the training objective went down


def test_artifact_is_the_toolchains_w4a16_layout(
    qat_run: tuple[QatResult, Path], tiny_model_dir: Path
) -> None:
    _, out = qat_run
    manifest = verify_artifact(out)
    assert manifest.kind == "qat" and manifest.source is not None
    assert manifest.parameters["group_size"] == GROUP and manifest.parameters["bits"] == 4
    assert manifest.data is not None and manifest.data.name == BUILTIN_CORPUS
    assert manifest.quality.eval_data is not None and manifest.quality.eval_data.num_samples == 16
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (quant["quant_method"], quant["format"], quant["ignore"]) == (
        "compressed-tensors",
        "pack-quantized",
        ["lm_head"],
    )
    weights = quant["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["strategy"], weights["symmetric"]) == (
        4,
        GROUP,
        "group",
        False,
    )
    tensors = _tensors(out)
    prefixes = sorted(k.removesuffix(".weight_packed") for k in tensors if k.endswith(".weight_packed"))
    assert len(prefixes) == 2 * len(LINEARS)
    for prefix in prefixes:
        rows, columns = tensors[f"{prefix}.weight_shape"].tolist()
        assert tensors[f"{prefix}.weight_packed"].dtype == torch.int32
        assert tensors[f"{prefix}.weight_packed"].shape == (rows, columns // 8)
        assert tensors[f"{prefix}.weight_scale"].shape == (rows, columns // GROUP)
        assert tensors[f"{prefix}.weight_zero_point"].shape == (rows // 8, columns // GROUP)
        assert f"{prefix}.weight" not in tensors
    assert "lm_head.weight" in tensors
    assert {"train_log.json", "loss_curve.png", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    out_model = load_causal_lm(out, device_map="cpu")
    generated = out_model.generate(torch.tensor([[1, 40, 41, 42]]), max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 8)


def test_qat_run_is_monitored(qat_run: tuple[QatResult, Path]) -> None:
    result, out = qat_run
    scalars, _ = tensorboard_events(out.parent / f"{out.name}.work" / TENSORBOARD_DIR)
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, 31))
    assert [s for s, _ in scalars["eval/loss"]] == [0, 15, 30]
    assert result.alerts == []


def test_rtn_starting_point_is_the_toolchains_rtn(tiny_model_dir: Path, tmp_path: Path) -> None:
    """An untrained QAT export is, tensor for tensor, the artifact `quantize rtn` writes (same group size,
    asymmetric): so the rtn_* figures QAT records are the toolchain's RTN, not a look-alike."""
    python = os.environ.get("LLMSTACK_QUANT_PYTHON")
    if not python:
        pytest.skip(
            "LLMSTACK_QUANT_PYTHON is unset: the toolchain environment is needed (run via `make test`)"
        )
    rtn = tmp_path / "rtn"
    command = [python, "-m", "quantize.cli", "rtn", "--model", str(tiny_model_dir), "--output", str(rtn)]
    command += ["--group-size", str(GROUP), "--eval-samples", "2", "--eval-seq-len", "16"]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    model = load_causal_lm(tiny_model_dir, dtype=torch.float32)
    settings = QatSettings(group_size=GROUP)
    prepare_fake_quant(model, settings)
    export_compressed(model, tmp_path / "qat0", settings, torch.float32)
    ours, theirs = _tensors(tmp_path / "qat0"), _tensors(rtn)
    assert sorted(ours) == sorted(theirs)
    different = [name for name in ours if not torch.equal(ours[name], theirs[name])]
    assert different == []
    config = {
        p: json.loads((p / "config.json").read_text())["quantization_config"]
        for p in (rtn, tmp_path / "qat0")
    }
    assert config[rtn]["config_groups"] == config[tmp_path / "qat0"]["config_groups"]


def _train(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "train.cli", *args], cwd=cwd, capture_output=True, text=True)


def test_cli_refuses_a_group_size_that_does_not_divide_the_layers(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    recipe = tmp_path / "qat.yaml"
    recipe.write_text("qat: {group_size: 48}\n")
    flags = ["--model", str(tiny_model_dir), "--data", BUILTIN_CORPUS, "--output", str(tmp_path / "out")]
    run = _train("qat", *flags, "--config", str(recipe), cwd=tmp_path)
    assert run.returncode == 2
    last = run.stderr.strip().splitlines()[-1]
    assert last == (
        "error: group size 48 does not divide the quantized layers' input width(s) [128, 256]; "
        "choose a divisor of 128"
    )
    assert not (tmp_path / "out").exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text("qat: {bits: 3, kl_weight: 2}\nloop: {report_to: [mlflow]}\n")
    refused = _train("qat", *flags, "--config", str(bad), cwd=tmp_path)
    assert refused.returncode == 2
    message = refused.stderr.strip().splitlines()[-1]
    for fragment in ("qat.bits", "qat.kl_weight", "loop.report_to"):
        assert fragment in message


def test_resumed_qat_repeats_the_uninterrupted_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A QAT run resumed from its step-2 checkpoint (the step-4 one removed, as if killed after step 3)
    restores weights, scale factors, zero points and optimizer state: same per-step log, same artifact."""
    import shutil

    settings = {**RECIPE, "qat": {**RECIPE["qat"], "compare_rtn": False}}
    settings["loop"] = {**RECIPE["loop"], "max_steps": 4, "checkpoint_every": 2, "eval_every": 2}
    settings["evaluation"] = {"eval_samples": 2, "eval_seq_len": 16}
    recipe = QatRecipe.model_validate(settings)
    out = tmp_path / "qat"
    train_qat(tiny_model_dir, BUILTIN_CORPUS, out, recipe)
    reference = json.loads((out / "train_log.json").read_text())
    reference_tensors = _tensors(out)
    shutil.rmtree(out)
    shutil.rmtree(tmp_path / "qat.work" / "checkpoints" / "step-00000004")
    train_qat(tiny_model_dir, BUILTIN_CORPUS, out, recipe, resume=True)
    resumed = json.loads((out / "train_log.json").read_text())
    assert resumed["history"] == reference["history"] and resumed["evals"] == reference["evals"]
    assert all(torch.equal(t, reference_tensors[name]) for name, t in _tensors(out).items())
