"""Quantization-aware training (QAT): fine-tune a model through fake-quantized W{bits}A16 weights, then export
it as a compressed-tensors artifact (`pack-quantized`, as `quantize rtn|gptq|awq` write) that vLLM and
transformers load as-is.

Invariants:
- The quantized layers are the toolchain's: every Linear but `lm_head`, as compressed-tensors matches them
  (`match_named_modules(model, ["Linear"], ["lm_head"])`). Each computes with its weight fake-quantized on
  compressed-tensors' own integer group grid, in its operation order: q = round(clamp(w / s + z, qmin, qmax)),
  w_hat = (q - z) * s. Rounding passes gradients straight through (STE); the per-group scale is
  s = s0 * exp(u) with u learned (a multiplicative step, whatever the scale's magnitude), and an asymmetric
  grid's zero point z is learned too (rounded with STE).
- Training starts at round-to-nearest: s0 and z are compressed-tensors' min-max parameters
  (`calculate_qparams`, what `quantize rtn` uses), and exp(0) = 1 exactly, so an untrained export is the RTN
  artifact and `compare_rtn` measures QAT against exactly its own starting point.
- The export hands the trained fp32 weights and the learned s and z to compressed-tensors' compressor
  (`apply_quantization_config`, `ModelCompressor.compress_model`): the integer codes it packs are the ones
  training computed with; the floating tensors (scales, embeddings, norms, lm_head) are then stored in the
  source model's dtype.
- The objective is kl_weight * T^2 * KL(full-precision model || fake-quantized model) + (1 - kl_weight) * CE
  per target token. The artifact's quality is measured on the files as written, on held-out text training
  never saw, exactly as `quantize` measures its artifacts (`core.quality.evaluate`).
"""

from __future__ import annotations

import copy
import logging
import math
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from accelerate import PartialState
from accelerate.utils import set_seed
from pydantic import BaseModel, Field
from torch import nn
from torch.nn.utils import parametrize

from core.artifact import Quality, check_destination
from core.config import StrictModel
from core.errors import ConfigError
from core.models import check_architecture, load_causal_lm, load_tokenizer, read_config, resolve_model_dir
from core.quality import SUPPORTED_BITS, EvalConfig, WeightBits, evaluate, write_measured_artifact
from core.textdata import data_info, load_texts
from train.checkpoint import is_sharded
from train.config import LoopConfig
from train.data import Example, collate, pad_token_id, tokenize_texts
from train.distill import flops_per_token, target_kl, teacher_outputs
from train.loop import Batch, TrainingError, TrainTask, make_accelerator, token_ce_sum, train
from train.report import LOG_NAME, PLOT_NAME

if TYPE_CHECKING:
    from compressed_tensors.quantization import QuantizationArgs

log = logging.getLogger(__name__)

QUANTIZED_TARGETS = ["Linear"]
IGNORED_MODULES = ["lm_head"]  # the toolchain's choice: the output projection stays in the source dtype
PACK_QUANTIZED = "pack-quantized"


class QatSettings(StrictModel):
    """What is fake-quantized and what is learned."""

    bits: WeightBits = Field(
        default=4, description=f"Weight bits; supported: {', '.join(map(str, SUPPORTED_BITS))} (as quantize)."
    )
    group_size: int = Field(
        default=128, ge=1, description="Input channels sharing one scale (and zero point), as in quantize."
    )
    symmetric: bool = Field(
        default=False, description="Symmetric groups (no zero point); default asymmetric, as `quantize rtn`."
    )
    learn_scales: bool = Field(
        default=True, description="Learn the per-group scales (and asymmetric zero points) with STE."
    )
    train_weights: bool = Field(
        default=True, description="Also fine-tune the quantized layers' weights (false: scales only)."
    )
    scale_lr: float = Field(
        default=1e-3,
        gt=0,
        description="Learning rate of the log-scale factors and zero points (weights use loop.optim.lr).",
    )
    kl_weight: float = Field(
        default=1.0,
        ge=0,
        le=1,
        description="Weight of KL(full-precision model || QAT model); 1 - kl_weight goes to cross-entropy.",
    )
    temperature: float = Field(default=1.0, gt=0, description="Softmax temperature of the KL term.")
    compare_rtn: bool = Field(
        default=True,
        description="Also export and evaluate the untrained starting point (round-to-nearest, same grid) "
        "and record its figures as rtn_* in the manifest's quality.extra.",
    )

    def quantization_args(self) -> QuantizationArgs:
        from compressed_tensors.quantization import QuantizationArgs

        return QuantizationArgs(
            num_bits=self.bits,
            type="int",
            symmetric=self.symmetric,
            strategy="group",
            group_size=self.group_size,
        )


class QatData(StrictModel):
    """How the training text is cut (the text itself is `--data`)."""

    max_length: int = Field(default=256, ge=8, description="Tokens per training sample (truncated).")
    max_samples: int | None = Field(default=None, ge=1, description="Use at most this many training texts.")
    validation_every: int = Field(
        default=10,
        ge=2,
        description="Every N-th training text is held back for the loop's validation loss (early stopping); "
        "the artifact's quality is measured on separate held-out text (`evaluation`).",
    )


class QatRecipe(StrictModel):
    """A QAT recipe: `train qat --config recipe.yaml`."""

    qat: QatSettings = Field(default_factory=QatSettings)
    data: QatData = Field(default_factory=QatData)
    loop: LoopConfig = Field(default_factory=LoopConfig)
    evaluation: EvalConfig = Field(
        default_factory=EvalConfig, description="Held-out evaluation of the artifact against its source."
    )


class QatResult(BaseModel):
    output: Path
    steps: int
    perplexity: float
    perplexity_source: float
    mean_kl: float
    top1_agreement: float
    rtn_perplexity: float | None
    rtn_mean_kl: float | None
    validation_loss_initial: float | None
    validation_loss: float
    train_texts: int
    validation_texts: int
    stopped_early: bool
    alerts: list[dict[str, Any]]  # loss spikes, skipped non-finite steps, rollbacks (see train.monitor)
    memory: dict[str, Any]  # gradient checkpointing on/off, peak memory of the run (train.loop)


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward (straight-through). x + (round(x) - x) is exactly round(x) in
    floating point: the difference of x and its rounding is exact (Sterbenz), so adding it back is too."""
    return x + (torch.round(x) - x).detach()


class _GroupFakeQuantize(torch.autograd.Function):
    """w_hat = (round(clamp(w / s + z, qmin, qmax)) - z) * s per group, with straight-through rounding.

    The gradients are those autograd derives for that expression with `_round_ste` (see
    `fake_quantize_reference`), written out so that backward keeps only the inputs (w, s, z) and recomputes
    the rest: autograd's saved intermediates cost 0.9 GB more on SmolLM2-135M at 4 x 128 tokens (peak RSS
    3.8 vs 2.9 GB, measured). Inside the grid
    (qmin <= w / s + z <= qmax): dw = g, ds = g * (q - z - w / s), dz = 0; clipped: dw = 0,
    ds = g * (q - z), dz = -g * s. ds and dz are summed over each group."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, q_min: int, q_max: int
    ) -> torch.Tensor:
        ctx.save_for_backward(weight, scale, zero)
        ctx.q_min, ctx.q_max = q_min, q_max
        s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
        q = torch.round(torch.clamp(weight.unflatten(-1, (scale.shape[-1], -1)) / s + z, q_min, q_max))
        return ((q - z) * s).flatten(-2)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        weight, scale, zero = ctx.saved_tensors
        s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
        g = grad.unflatten(-1, (scale.shape[-1], -1))
        x = weight.unflatten(-1, (scale.shape[-1], -1)) / s + z
        inside = (x >= ctx.q_min) & (x <= ctx.q_max)
        q = torch.round(torch.clamp(x, ctx.q_min, ctx.q_max))
        grad_weight = (g * inside).flatten(-2) if ctx.needs_input_grad[0] else None
        grad_scale = None
        if ctx.needs_input_grad[1]:
            grad_scale = (g * (q - z - inside * (x - z))).sum(-1)
        grad_zero = (-(g * s) * ~inside).sum(-1) if ctx.needs_input_grad[2] else None
        return grad_weight, grad_scale, grad_zero, None, None


def fake_quantize_reference(
    weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, q_min: int, q_max: int
) -> torch.Tensor:
    """The fake quantization as plain autograd operations (what `_GroupFakeQuantize` must equal, values and
    gradients; kept for the tests)."""
    s = scale.unsqueeze(-1)
    x = weight.unflatten(-1, (scale.shape[-1], -1)) / s
    if zero is not None:
        x = x + zero.unsqueeze(-1)
    q = _round_ste(x.clamp(q_min, q_max))
    if zero is not None:
        q = q - zero.unsqueeze(-1)
    return (q * s).flatten(-2)


class GroupFakeQuant(nn.Module):
    """A weight parametrization: w -> (q - z) * s on compressed-tensors' group grid (module docstring).

    `log_scale_ratio` (u) and `zero_point` are the learned quantization parameters; `base_scale` (s0) is the
    min-max scale of the weight it was built from."""

    def __init__(self, weight: torch.Tensor, args: QuantizationArgs) -> None:
        from compressed_tensors.quantization.utils import calculate_qparams

        super().__init__()
        group_size = args.group_size
        assert group_size is not None and weight.shape[-1] % group_size == 0
        self.group_size = group_size
        self.q_min, self.q_max = -(2 ** (args.num_bits - 1)), 2 ** (args.num_bits - 1) - 1
        groups = weight.detach().float().unflatten(-1, (-1, group_size))
        scale, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
        self.base_scale: torch.Tensor
        self.register_buffer("base_scale", scale.float())
        self.log_scale_ratio = nn.Parameter(torch.zeros_like(self.base_scale))
        self.zero_point = None if args.symmetric else nn.Parameter(zero.float())

    def scale(self) -> torch.Tensor:
        return self.base_scale * self.log_scale_ratio.exp()

    def integer_zero_point(self) -> torch.Tensor | None:
        if self.zero_point is None:
            return None
        return _round_ste(self.zero_point.clamp(self.q_min, self.q_max))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        scale = self.scale()
        zero = self.integer_zero_point()
        zero = torch.zeros_like(scale) if zero is None else zero
        out = _GroupFakeQuantize.apply(weight.float(), scale, zero, self.q_min, self.q_max)
        return cast(torch.Tensor, out).to(weight.dtype)


def quantized_module_names(model: nn.Module) -> list[str]:
    """The Linear layers the toolchain quantizes, as compressed-tensors matches them."""
    from compressed_tensors.utils import match_named_modules

    return [name for name, _ in match_named_modules(model, QUANTIZED_TARGETS, IGNORED_MODULES)]


def check_group_size(model: nn.Module, group_size: int) -> None:
    """Every quantized layer's input width must be a multiple of the group size (whole groups, as
    compressed-tensors and vLLM's kernels need); refuse naming the widths that are not."""
    layers = [cast(nn.Linear, model.get_submodule(name)) for name in quantized_module_names(model)]
    widths = {layer.in_features for layer in layers}
    bad = sorted(w for w in widths if w % group_size)
    if bad:
        raise ConfigError(
            f"group size {group_size} does not divide the quantized layers' input width(s) {bad}; "
            f"choose a divisor of {math.gcd(*widths)}"
        )


def prepare_fake_quant(model: nn.Module, settings: QatSettings) -> list[str]:
    """Fake-quantize the model's quantized layers in place (a weight parametrization on each) and set what
    trains: the layers' weights (`train_weights`) and their quantization parameters (`learn_scales`);
    everything else is frozen. Returns the layer names."""
    check_group_size(model, settings.group_size)
    if not (settings.learn_scales or settings.train_weights):
        raise ConfigError("qat: learn_scales and train_weights are both false, nothing would be trained")
    args = settings.quantization_args()
    names = quantized_module_names(model)
    model.requires_grad_(False)
    for name in names:
        layer = cast(nn.Linear, model.get_submodule(name))
        parametrize.register_parametrization(layer, "weight", GroupFakeQuant(layer.weight, args))
        weight = cast(Any, layer).parametrizations.weight
        weight.original.requires_grad_(settings.train_weights)
        weight[0].requires_grad_(settings.learn_scales)
    return names


def is_quantization_parameter(name: str) -> bool:
    """Whether a parameter name is a GroupFakeQuant's (a scale factor or zero point)."""
    return ".parametrizations.weight.0." in name


def fake_quantizers(model: nn.Module) -> dict[str, GroupFakeQuant]:
    """The fake quantizers of a prepared model, by layer name."""
    found = {}
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            quantizer = cast(Any, module).parametrizations.weight[0]
            if isinstance(quantizer, GroupFakeQuant):
                found[name] = quantizer
    return found


@torch.no_grad()
def export_compressed(model: nn.Module, out: Path, settings: QatSettings, dtype: torch.dtype) -> list[str]:
    """Write `model` (a transformers model prepared by `prepare_fake_quant`; changed in place, do not train
    it afterwards) as a compressed-tensors pack-quantized folder in `dtype`; returns the quantized layer
    names."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )

    learned = {}
    for name, quantizer in fake_quantizers(model).items():
        zero = quantizer.integer_zero_point()
        learned[name] = (quantizer.scale().detach().clone(), None if zero is None else zero.detach().clone())
        parametrize.remove_parametrizations(model.get_submodule(name), "weight", leave_parametrized=False)
    scheme = QuantizationScheme(targets=QUANTIZED_TARGETS, weights=settings.quantization_args())
    config = QuantizationConfig(
        config_groups={"group_0": scheme},
        ignore=IGNORED_MODULES,
        quantization_status=QuantizationStatus.FROZEN,
    )
    model.float()
    apply_quantization_config(model, config)
    names = [name for name, module in model.named_modules() if getattr(module, "quantization_scheme", None)]
    if sorted(names) != sorted(learned):
        raise TrainingError(f"compressed-tensors quantizes {len(names)} layers, QAT trained {len(learned)}")
    for name in names:
        layer = cast(Any, model.get_submodule(name))
        scale, zero = learned[name]
        layer.weight_scale.copy_(scale)
        if zero is not None:
            layer.weight_zero_point.copy_(zero.to(layer.weight_zero_point.dtype))
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=PACK_QUANTIZED)
    compressor.compress_model(model)  # integer codes computed here, in fp32, from the trained w, s, z
    hf_model = cast(Any, model)  # a transformers PreTrainedModel
    hf_model.to(dtype)  # floating tensors only: the packed codes stay int32
    hf_model.config.dtype = dtype
    hf_model.save_pretrained(out)
    compressor.update_config(str(out))
    return names


def _source_dtype(model_dir: Path) -> torch.dtype:
    config = read_config(model_dir)
    name = str(config.get("dtype") or config.get("torch_dtype") or "float32").removeprefix("torch.")
    dtype = getattr(torch, name, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _build_task(
    student: nn.Module,
    teacher: nn.Module,
    settings: QatSettings,
    lr: float,
    train_data: list[Example],
    validation: list[Example],
    pad_id: int,
) -> TrainTask:
    alpha, temperature = settings.kl_weight, settings.temperature

    def loss_fn(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ce, tokens = token_ce_sum(logits, batch["labels"])
        if alpha == 0:
            return ce, tokens
        target = teacher_outputs(teacher, batch, logits.device).logits
        kl = target_kl(logits, target, batch["labels"], temperature)
        return alpha * kl + (1 - alpha) * ce, tokens

    params = sum(p.numel() for p in teacher.parameters())
    return TrainTask(
        model=student,
        loss_fn=loss_fn,
        train_data=train_data,
        eval_data=validation,
        collate=lambda examples: collate(examples, pad_id),
        flops_per_token=flops_per_token(params, params, with_teacher=alpha != 0),
        lr_multiplier=lambda name: settings.scale_lr / lr if is_quantization_parameter(name) else 1.0,
    )


def default_work_dir(output: Path) -> Path:
    return output.parent / f"{output.name}.work"


def train_qat(
    model: Path,
    data: str,
    output: Path,
    recipe: QatRecipe,
    *,
    work_dir: Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> QatResult:
    """QAT of `model` on the text `data` (.txt/.jsonl file or builtin:pydoc-topics); writes a `qat` artifact
    (compressed-tensors W{bits}A16) to `output` with its measured quality."""
    model = resolve_model_dir(model)
    check_architecture(model)
    check_destination(output, overwrite=overwrite)
    settings = recipe.qat
    texts, data_name = load_texts(data, split="train")
    texts = [t for t in texts if t.strip()][: recipe.data.max_samples]
    every = recipe.data.validation_every
    validation_texts = texts[every - 1 :: every]
    train_texts = [t for i, t in enumerate(texts) if i % every != every - 1]
    tokenizer = load_tokenizer(model)
    train_data = tokenize_texts(tokenizer, train_texts, recipe.data.max_length)
    validation = tokenize_texts(tokenizer, validation_texts, recipe.data.max_length)
    if not train_data or not validation:
        raise ConfigError(
            f"{data_name}: {len(train_data)} training and {len(validation)} validation samples of 2 "
            f"tokens or more; QAT needs both (add text or lower data.validation_every)"
        )
    pad_id = pad_token_id(tokenizer)

    set_seed(recipe.loop.seed)
    teacher = load_causal_lm(model, dtype=torch.float32)
    teacher.requires_grad_(False)
    student = copy.deepcopy(teacher).train()
    names = prepare_fake_quant(student, settings)
    log.info(
        "QAT: %d fake-quantized layers, %d training / %d validation samples",
        len(names),
        len(train_data),
        len(validation),
    )
    accelerator = make_accelerator()
    if is_sharded(accelerator):
        raise TrainingError(
            "train qat does not support FSDP yet: run it in one process or data-parallel (DDP)"
        )
    main = PartialState().is_main_process
    dtype = _source_dtype(model)
    rtn: Quality | None = None
    if settings.compare_rtn and main:  # the starting point is the same on a resumed run
        rtn = _measure_rtn(teacher, settings, dtype, model, recipe.evaluation, tokenizer)

    work = work_dir or default_work_dir(output)
    if overwrite and not resume:  # a fresh run replacing an earlier output starts from no checkpoint
        shutil.rmtree(work / "checkpoints", ignore_errors=True)
    task = _build_task(student, teacher, settings, recipe.loop.optim.lr, train_data, validation, pad_id)
    result = train(task, recipe.loop, work, resume=resume, accelerator=accelerator)

    extra: dict[str, float] = {"validation_loss": result.final_eval_loss}
    if result.initial_eval_loss is not None:
        extra["validation_loss_initial"] = result.initial_eval_loss
    if result.final_train_loss is not None:
        extra["train_loss"] = result.final_train_loss
    if rtn is not None:
        extra.update(_prefixed("rtn_", rtn))

    def write(tmp: Path) -> dict[str, Any]:
        export_compressed(student, tmp, settings, dtype)
        tokenizer.save_pretrained(tmp)
        for name in (LOG_NAME, PLOT_NAME):
            if (work / name).is_file():
                shutil.copy2(work / name, tmp / name)
        return {
            "method": "qat",
            "format": "compressed-tensors",
            **settings.model_dump(mode="json"),
            "data": recipe.data.model_dump(mode="json"),
            "loop": recipe.loop.model_dump(mode="json"),
            "steps": result.steps,
        }

    quality = None
    if main:  # one writer under accelerate launch / torchrun
        quality = write_measured_artifact(
            output,
            "qat",
            model,
            write,
            data=data_info(data_name, train_texts, num_tokens=sum(len(e.input_ids) for e in train_data)),
            eval_config=recipe.evaluation,
            tools=("torch", "transformers", "compressed-tensors", "accelerate"),
            overwrite=overwrite,
            extra=extra,
        ).quality
        log.info("QAT artifact written to %s (mean KL %.5f)", output, quality.mean_kl)
    PartialState().wait_for_everyone()
    return QatResult(
        output=output,
        steps=result.steps,
        perplexity=_figure(quality, "perplexity"),
        perplexity_source=_figure(quality, "perplexity_source"),
        mean_kl=_figure(quality, "mean_kl"),
        top1_agreement=_figure(quality, "top1_agreement"),
        rtn_perplexity=rtn.perplexity if rtn else None,
        rtn_mean_kl=rtn.mean_kl if rtn else None,
        validation_loss_initial=result.initial_eval_loss,
        validation_loss=result.final_eval_loss,
        train_texts=len(train_data),
        validation_texts=len(validation),
        stopped_early=result.stopped_early,
        alerts=result.alerts,
        memory=result.memory,
    )


def _measure_rtn(
    full_precision: nn.Module,
    settings: QatSettings,
    dtype: torch.dtype,
    source: Path,
    config: EvalConfig,
    tokenizer: Any,
) -> Quality:
    """Export QAT's untrained starting point (round-to-nearest) to a scratch folder and evaluate it.

    It is prepared afresh on a copy of the full-precision model: a deep copy of a parametrized model shares
    torch's generated parametrized classes with the original, so removing the copy's parametrizations at
    export would strip the original's too."""
    start = copy.deepcopy(full_precision)
    prepare_fake_quant(start, settings)
    with tempfile.TemporaryDirectory(prefix="qat-rtn-") as tmp:
        export_compressed(start, Path(tmp), settings, dtype)
        tokenizer.save_pretrained(tmp)
        quality = evaluate(Path(tmp), reference_dir=source, config=config)
    log.info("RTN starting point: mean KL %.5f, perplexity %.3f", quality.mean_kl, quality.perplexity)
    return quality


def _prefixed(prefix: str, quality: Quality) -> dict[str, float]:
    figures = quality.model_dump(include={"perplexity", "mean_kl", "top1_agreement"})
    return {f"{prefix}{name}": value for name, value in figures.items() if value is not None}


def _figure(quality: Quality | None, name: str) -> float:
    value = getattr(quality, name, None) if quality is not None else None
    return float(value) if value is not None else math.nan
