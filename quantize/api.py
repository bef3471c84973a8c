"""The toolchain's Python API: `quantize` (every quantization method, chosen by its config), `merge_lora`,
`distill` and `evaluate`; each of the first three produces a verified artifact folder.

Invariant: every input is checked (source model, architecture, destination, data) before any model is
loaded; the artifact is written atomically by `core.quality.write_measured_artifact`, and its manifest
carries the held-out evaluation of the result against its source, measured on the files as written.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core import quality as evaluation
from core.artifact import ArtifactKind, DataInfo, Manifest, Quality, check_destination
from core.errors import ConfigError
from core.models import check_architecture, load_tokenizer, read_config, resolve_model_dir
from core.quality import EvalConfig
from core.textdata import load_samples
from quantize.calibration import calibration_dataset
from quantize.config import (
    CalibratedConfig,
    CalibrationConfig,
    MergeLoraConfig,
    MethodConfig,
    WeightQuantConfig,
)
from quantize.methods import method_for

if TYPE_CHECKING:
    from datasets import Dataset

    from train.distill import DistillConfig

log = logging.getLogger(__name__)
TOOLS = (
    "llmcompressor", "compressed-tensors", "gptqmodel", "transformers", "torch", "bitsandbytes", "peft",
    "accelerate",
)  # fmt: skip


def _check_source(model: Path) -> Path:
    folder = resolve_model_dir(model)
    check_architecture(folder)
    return folder


def _check_group_size(source: Path, group_size: int) -> None:
    """Every quantized Linear's input width must be a multiple of the group size (compressed-tensors and
    vLLM's kernels need whole groups); refuse before any work."""
    config = read_config(source)
    heads = config.get("num_attention_heads", 0)
    widths = {
        "hidden_size": config.get("hidden_size"),
        "intermediate_size": config.get("intermediate_size"),
        "attention width": (config.get("head_dim") or config.get("hidden_size", 0) // max(heads, 1)) * heads,
    }
    known = {name: width for name, width in widths.items() if isinstance(width, int) and width}
    for name, width in known.items():
        if width % group_size:
            raise ConfigError(
                f"group size {group_size} does not divide the model's {name} ({width}); "
                f"choose a divisor of {math.gcd(*known.values())}"
            )


def _produce(
    kind: ArtifactKind,
    source: Path,
    output: Path,
    write: Callable[[Path], dict[str, Any]],
    *,
    data: DataInfo | None,
    eval_config: EvalConfig,
    overwrite: bool,
    extra: dict[str, float] | None = None,
) -> Manifest:
    """`core.quality.write_measured_artifact` with the toolchain's `TOOLS` recorded."""
    manifest = evaluation.write_measured_artifact(
        output, kind, source, write, data=data, eval_config=eval_config, tools=TOOLS, overwrite=overwrite,
        extra=extra,
    )  # fmt: skip
    log.info("artifact %s (%s) written", output, kind)
    return manifest


def _calibration(source: Path, config: CalibrationConfig) -> tuple[Dataset, DataInfo]:
    texts, name = load_samples(config.calib_data, split="train", limit=config.num_samples)
    return calibration_dataset(texts, name, load_tokenizer(source), config.max_seq_len)


def quantize(
    model: Path,
    output: Path,
    config: MethodConfig,
    *,
    eval_config: EvalConfig | None = None,
    overwrite: bool = False,
) -> Manifest:
    """Quantize `model` with the method `config` configures (`AwqConfig`, `GptqConfig`, `RtnConfig`,
    `Nf4Config`: see `quantize.methods.METHODS`) into the checkpoint format `config.format` names; the
    manifest records the method's parameters, the calibration samples used and the held-out quality."""
    method = method_for(config)
    source = _check_source(model)
    check_destination(output, overwrite=overwrite)
    if isinstance(config, WeightQuantConfig):
        _check_group_size(source, config.group_size)
    dataset, data = (
        _calibration(source, config.calibration) if isinstance(config, CalibratedConfig) else (None, None)
    )
    writer = method.writer(config)

    def write(tmp: Path) -> dict[str, Any]:
        writer(source, tmp, config, dataset)
        return {"method": method.kind, **config.model_dump(mode="json")}

    return _produce(
        method.kind, source, output, write, data=data, eval_config=eval_config or EvalConfig(),
        overwrite=overwrite,
    )  # fmt: skip


def merge_lora(
    base: Path,
    output: Path,
    config: MergeLoraConfig,
    *,
    eval_config: EvalConfig | None = None,
    overwrite: bool = False,
) -> Manifest:
    """Merge LoRA adapters into `base`; the manifest compares the merged model with the base."""
    from quantize.methods import merge_lora as method

    source = _check_source(base)
    check_destination(output, overwrite=overwrite)
    method.check_inputs(source, config)
    return _produce(
        "merged", source, output, lambda tmp: method.merge(source, tmp, config),
        data=None, eval_config=eval_config or EvalConfig(), overwrite=overwrite,
    )  # fmt: skip


def distill(
    config: DistillConfig,
    output: Path,
    *,
    eval_config: EvalConfig | None = None,
    overwrite: bool = False,
) -> Manifest:
    """Distil `config.teacher` into a student with the training backend's loop (`train.distill`), then
    evaluate the student against the teacher. The held-out losses `train.distill` measures (distilled,
    initial, teacher and, with `compare_hard_labels`, the same student trained on hard labels only) go into
    the manifest's `quality.extra`."""
    from core.textdata import data_info, load_texts
    from train.distill import distill as run_distill

    teacher = _check_source(config.teacher)
    if config.student is not None:
        _check_source(config.student)
    check_destination(output, overwrite=overwrite)
    texts, name = load_texts(config.data, split="train")
    if config.eval_data is not None:
        load_texts(config.eval_data, split="heldout")

    def write(tmp: Path) -> dict[str, Any]:
        result = run_distill(config, tmp)
        log.info("distillation: %s", result.model_dump())
        losses.update(
            {k: v for k, v in result.model_dump().items() if k.startswith("heldout_loss") and v is not None}
        )
        return {
            "method": "distill",
            **config.model_dump(mode="json", exclude={"work_dir", "resume"}),
            "result": result.model_dump(),
        }

    losses: dict[str, float] = {}
    return _produce(
        "distilled", teacher, output, write, data=data_info(name, texts),
        eval_config=eval_config or EvalConfig(), overwrite=overwrite, extra=losses,
    )  # fmt: skip


def evaluate(model: Path, *, reference: Path | None = None, eval_config: EvalConfig | None = None) -> Quality:
    """Held-out perplexity of `model`; with `reference`, also mean KL and top-1 agreement against it."""
    folder = _check_source(model)
    reference_folder = _check_source(reference) if reference is not None else None
    return evaluation.evaluate(folder, reference_dir=reference_folder, config=eval_config)
