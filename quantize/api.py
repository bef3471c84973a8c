"""The toolchain's Python API: one function per sub-command, each producing a verified artifact folder.

Invariant: every input is checked (source model, architecture, destination, data) before any model is
loaded; the artifact is written atomically by `core.artifact.write_artifact`, and its manifest carries the
held-out evaluation of the result against its source, measured on the files as written.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.artifact import (
    ArtifactKind,
    DataInfo,
    Manifest,
    ManifestDraft,
    Quality,
    SourceModel,
    check_destination,
    folder_digest,
    tool_versions,
    write_artifact,
)
from core.models import check_architecture, load_causal_lm, load_tokenizer, resolve_model_dir
from quantize import eval as evaluation
from quantize.calibration import calibration_dataset, load_samples
from quantize.config import (
    AwqConfig,
    CalibrationConfig,
    EvalConfig,
    GptqConfig,
    MergeLoraConfig,
    Nf4Config,
    RtnConfig,
)

log = logging.getLogger(__name__)
TOOLS = ("llmcompressor", "compressed-tensors", "transformers", "torch", "bitsandbytes", "peft", "accelerate")


def _check_source(model: Path) -> Path:
    folder = resolve_model_dir(model)
    check_architecture(folder)
    return folder


def _produce(
    kind: ArtifactKind,
    source: Path,
    output: Path,
    write: Callable[[Path], dict[str, Any]],
    *,
    data: DataInfo | None,
    eval_config: EvalConfig,
    overwrite: bool,
) -> Manifest:
    """Run `write(tmp)` (returns the method parameters), evaluate the result against `source`, and commit
    the artifact with its manifest."""

    def populate(tmp: Path) -> ManifestDraft:
        parameters = write(tmp)
        quality = evaluation.evaluate(tmp, reference_dir=source, config=eval_config)
        return ManifestDraft(
            kind=kind,
            source=SourceModel(path=str(source), digest=folder_digest(source)),
            parameters=parameters,
            data=data,
            quality=quality,
            tool_versions=tool_versions(*TOOLS),
        )

    manifest = write_artifact(output, populate, overwrite=overwrite)
    log.info("artifact %s (%s) written", output, kind)
    return manifest


def _calibration(source: Path, config: CalibrationConfig) -> tuple[Any, DataInfo]:
    texts, name = load_samples(config.calib_data, split="train", limit=config.num_samples)
    return calibration_dataset(texts, name, load_tokenizer(source), config.max_seq_len)


def _weight_quantization(
    kind: ArtifactKind,
    model: Path,
    output: Path,
    config: AwqConfig | GptqConfig | RtnConfig,
    run: Callable[..., None],
    *,
    eval_config: EvalConfig,
    overwrite: bool,
) -> Manifest:
    source = _check_source(model)
    check_destination(output, overwrite=overwrite)
    calibration = getattr(config, "calibration", None)
    dataset, data = _calibration(source, calibration) if calibration is not None else (None, None)

    def write(tmp: Path) -> dict[str, Any]:
        loaded, tokenizer = load_causal_lm(source), load_tokenizer(source)
        run(loaded, tokenizer, dataset, tmp, config)
        return {"method": kind, "format": "compressed-tensors", **config.model_dump(mode="json")}

    return _produce(kind, source, output, write, data=data, eval_config=eval_config, overwrite=overwrite)


def awq(
    model: Path,
    output: Path,
    config: AwqConfig | None = None,
    *,
    eval_config: EvalConfig | None = None,
    overwrite: bool = False,
) -> Manifest:
    """AWQ W4A16 (asymmetric groups) in compressed-tensors format, loaded natively by vLLM."""
    from quantize.methods import awq as method

    return _weight_quantization(
        "awq", model, output, config or AwqConfig(), method.quantize,
        eval_config=eval_config or EvalConfig(), overwrite=overwrite,
    )  # fmt: skip


def gptq(
    model: Path,
    output: Path,
    config: GptqConfig | None = None,
    *,
    eval_config: EvalConfig | None = None,
    overwrite: bool = False,
) -> Manifest:
    """GPTQ W4A16 (symmetric groups) in compressed-tensors format, loaded natively by vLLM."""
    from quantize.methods import gptq as method

    return _weight_quantization(
        "gptq", model, output, config or GptqConfig(), method.quantize,
        eval_config=eval_config or EvalConfig(), overwrite=overwrite,
    )  # fmt: skip


def rtn(
    model: Path,
    output: Path,
    config: RtnConfig | None = None,
    *,
    eval_config: EvalConfig | None = None,
    overwrite: bool = False,
) -> Manifest:
    """Round-to-nearest W4A16, the data-free baseline, in the same format as AWQ and GPTQ."""
    from quantize.methods import rtn as method

    return _weight_quantization(
        "rtn", model, output, config or RtnConfig(), method.quantize,
        eval_config=eval_config or EvalConfig(), overwrite=overwrite,
    )  # fmt: skip


def nf4(
    model: Path,
    output: Path,
    config: Nf4Config | None = None,
    *,
    eval_config: EvalConfig | None = None,
    overwrite: bool = False,
) -> Manifest:
    """bitsandbytes NF4 (double quantization by default), saved pre-quantized."""
    from quantize.methods import nf4 as method

    config = config or Nf4Config()
    source = _check_source(model)
    check_destination(output, overwrite=overwrite)

    def write(tmp: Path) -> dict[str, Any]:
        method.quantize(source, tmp, config)
        return {"method": "nf4", "format": "bitsandbytes", **config.model_dump(mode="json")}

    return _produce(
        "nf4", source, output, write, data=None, eval_config=eval_config or EvalConfig(), overwrite=overwrite
    )


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


def evaluate(model: Path, *, reference: Path | None = None, eval_config: EvalConfig | None = None) -> Quality:
    """Held-out perplexity of `model`; with `reference`, also mean KL and top-1 agreement against it."""
    folder = _check_source(model)
    reference_folder = _check_source(reference) if reference is not None else None
    return evaluation.evaluate(folder, reference_dir=reference_folder, config=eval_config)
