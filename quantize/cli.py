"""`quantize`: the toolchain's command line, a thin layer over `quantize.api`.

Invariant: option help comes from the config models' field descriptions; any user error (a `StackError`)
prints one line on stderr and exits with status 2, and nothing is written; stdout carries only the report
(what libraries print while a command runs, e.g. gptqmodel's logs, goes to stderr).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel

from core.artifact import Manifest, Quality
from core.errors import StackError
from quantize.config import (
    AwqConfig,
    CalibrationConfig,
    EvalConfig,
    GptqConfig,
    MergeLoraConfig,
    Nf4Config,
    RtnConfig,
    WeightQuantConfig,
    validated,
)

app = typer.Typer(
    help="Quantize, merge, distil and evaluate models; every output is a verified artifact folder.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _help(model: type[BaseModel], field: str) -> str:
    return model.model_fields[field].description or ""


def _default(model: type[BaseModel], field: str) -> Any:
    return model.model_fields[field].get_default(call_default_factory=True)


Model = Annotated[Path, typer.Option("--model", help="Source model folder (Hugging Face format).")]
Output = Annotated[Path, typer.Option("--output", help="Artifact folder to create.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output folder.")]
Bits = Annotated[int, typer.Option(help=_help(WeightQuantConfig, "bits"))]
GroupSize = Annotated[int, typer.Option(help=_help(WeightQuantConfig, "group_size"))]
CalibData = Annotated[str | None, typer.Option(help=_help(CalibrationConfig, "calib_data"))]
NumSamples = Annotated[int, typer.Option(help=_help(CalibrationConfig, "num_samples"))]
MaxSeqLen = Annotated[int, typer.Option(help=_help(CalibrationConfig, "max_seq_len"))]
EvalData = Annotated[str | None, typer.Option(help=_help(EvalConfig, "eval_data"))]
EvalSamples = Annotated[int, typer.Option(help=_help(EvalConfig, "eval_samples"))]
EvalSeqLen = Annotated[int, typer.Option(help=_help(EvalConfig, "eval_seq_len"))]
AwqFormat = Annotated[str, typer.Option("--format", help=_help(AwqConfig, "format"))]
GptqFormat = Annotated[str, typer.Option("--format", help=_help(GptqConfig, "format"))]

BITS = _default(WeightQuantConfig, "bits")
GROUP = _default(WeightQuantConfig, "group_size")
SAMPLES = _default(CalibrationConfig, "num_samples")
SEQ = _default(CalibrationConfig, "max_seq_len")
EVAL_SAMPLES = _default(EvalConfig, "eval_samples")
EVAL_SEQ = _default(EvalConfig, "eval_seq_len")
FORMAT = _default(AwqConfig, "format")


def _fail(err: StackError) -> typer.Exit:
    typer.echo(f"error: {err}", err=True)
    return typer.Exit(2)


@contextlib.contextmanager
def _library_output_to_stderr() -> Iterator[None]:
    with contextlib.redirect_stdout(sys.stderr):
        yield


def _write(output: Path, make: Callable[[], Manifest]) -> None:
    """Run `make` (validation, then the work; whatever libraries print goes to stderr) and report the
    artifact on stdout; a user error is one line on stderr and exit status 2."""
    try:
        with _library_output_to_stderr():
            manifest = make()
    except StackError as err:
        raise _fail(err) from None
    _report(output, manifest)


def _report(output: Path, manifest: Manifest) -> None:
    figures = manifest.quality.model_dump(exclude={"eval_data"}, exclude_none=True)
    typer.echo(f"wrote {manifest.kind} artifact {output}")
    typer.echo(json.dumps(figures, indent=2, sort_keys=True))


def _eval_config(eval_data: str | None, eval_samples: int, eval_seq_len: int) -> EvalConfig:
    return validated(EvalConfig, eval_data=eval_data, eval_samples=eval_samples, eval_seq_len=eval_seq_len)


def _calibration(calib_data: str | None, num_samples: int, max_seq_len: int) -> dict[str, Any]:
    return {"calib_data": calib_data, "num_samples": num_samples, "max_seq_len": max_seq_len}


@app.callback()
def _setup(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False,
) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(name)s: %(message)s")


@app.command()
def awq(
    model: Model,
    output: Output,
    bits: Bits = BITS,
    group_size: GroupSize = GROUP,
    checkpoint_format: AwqFormat = FORMAT,
    calib_data: CalibData = None,
    num_samples: NumSamples = SAMPLES,
    max_seq_len: MaxSeqLen = SEQ,
    eval_data: EvalData = None,
    eval_samples: EvalSamples = EVAL_SAMPLES,
    eval_seq_len: EvalSeqLen = EVAL_SEQ,
    overwrite: Overwrite = False,
) -> None:
    """AWQ (asymmetric groups) to compressed-tensors (llm-compressor) or the classic awq GEMM format
    (gptqmodel); vLLM loads both."""
    from quantize import api

    def make() -> Manifest:
        config = validated(
            AwqConfig,
            bits=bits,
            group_size=group_size,
            format=checkpoint_format,
            calibration=_calibration(calib_data, num_samples, max_seq_len),
        )
        eval_config = _eval_config(eval_data, eval_samples, eval_seq_len)
        return api.awq(model, output, config, eval_config=eval_config, overwrite=overwrite)

    _write(output, make)


@app.command()
def gptq(
    model: Model,
    output: Output,
    bits: Bits = BITS,
    group_size: GroupSize = GROUP,
    checkpoint_format: GptqFormat = FORMAT,
    calib_data: CalibData = None,
    num_samples: NumSamples = SAMPLES,
    max_seq_len: MaxSeqLen = SEQ,
    eval_data: EvalData = None,
    eval_samples: EvalSamples = EVAL_SAMPLES,
    eval_seq_len: EvalSeqLen = EVAL_SEQ,
    overwrite: Overwrite = False,
) -> None:
    """GPTQ (symmetric groups) to compressed-tensors (llm-compressor) or the classic gptq format (gptqmodel);
    vLLM loads both."""
    from quantize import api

    def make() -> Manifest:
        config = validated(
            GptqConfig,
            bits=bits,
            group_size=group_size,
            format=checkpoint_format,
            calibration=_calibration(calib_data, num_samples, max_seq_len),
        )
        eval_config = _eval_config(eval_data, eval_samples, eval_seq_len)
        return api.gptq(model, output, config, eval_config=eval_config, overwrite=overwrite)

    _write(output, make)


@app.command()
def rtn(
    model: Model,
    output: Output,
    bits: Bits = BITS,
    group_size: GroupSize = GROUP,
    symmetric: Annotated[bool, typer.Option(help=_help(RtnConfig, "symmetric"))] = False,
    eval_data: EvalData = None,
    eval_samples: EvalSamples = EVAL_SAMPLES,
    eval_seq_len: EvalSeqLen = EVAL_SEQ,
    overwrite: Overwrite = False,
) -> None:
    """Round-to-nearest (no calibration data), the baseline for AWQ and GPTQ, same format."""
    from quantize import api

    def make() -> Manifest:
        config = validated(RtnConfig, bits=bits, group_size=group_size, symmetric=symmetric)
        eval_config = _eval_config(eval_data, eval_samples, eval_seq_len)
        return api.rtn(model, output, config, eval_config=eval_config, overwrite=overwrite)

    _write(output, make)


@app.command()
def nf4(
    model: Model,
    output: Output,
    double_quant: Annotated[bool, typer.Option(help=_help(Nf4Config, "double_quant"))] = True,
    compute_dtype: Annotated[str, typer.Option(help=_help(Nf4Config, "compute_dtype"))] = "bfloat16",
    eval_data: EvalData = None,
    eval_samples: EvalSamples = EVAL_SAMPLES,
    eval_seq_len: EvalSeqLen = EVAL_SEQ,
    overwrite: Overwrite = False,
) -> None:
    """bitsandbytes NF4 (double quantization), saved pre-quantized; transformers loads it (vLLM: GPU only)."""
    from quantize import api

    def make() -> Manifest:
        config = validated(Nf4Config, double_quant=double_quant, compute_dtype=compute_dtype)
        eval_config = _eval_config(eval_data, eval_samples, eval_seq_len)
        return api.nf4(model, output, config, eval_config=eval_config, overwrite=overwrite)

    _write(output, make)


@app.command("merge-lora")
def merge_lora(
    base: Annotated[Path, typer.Option("--base", help="Full-precision base model folder.")],
    adapter: Annotated[list[Path], typer.Option("--adapter", help=_help(MergeLoraConfig, "adapters"))],
    output: Output,
    weights: Annotated[
        list[float] | None, typer.Option("--weights", help=_help(MergeLoraConfig, "weights"))
    ] = None,
    force: Annotated[bool, typer.Option("--force", help=_help(MergeLoraConfig, "force"))] = False,
    eval_data: EvalData = None,
    eval_samples: EvalSamples = EVAL_SAMPLES,
    eval_seq_len: EvalSeqLen = EVAL_SEQ,
    overwrite: Overwrite = False,
) -> None:
    """Merge LoRA adapters (optionally weighted) into the base with PEFT; the output is a plain model."""
    from quantize import api

    def make() -> Manifest:
        config = validated(MergeLoraConfig, adapters=adapter, weights=weights or None, force=force)
        eval_config = _eval_config(eval_data, eval_samples, eval_seq_len)
        return api.merge_lora(base, output, config, eval_config=eval_config, overwrite=overwrite)

    _write(output, make)


@app.command()
def distill(
    teacher: Annotated[Path, typer.Option(help="Teacher model folder.")],
    output: Output,
    data: Annotated[
        str | None, typer.Option(help="Training text: .txt/.jsonl file; default: the built-in corpus.")
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="Distillation recipe (YAML, e.g. train/recipes/distill.yaml).")
    ] = None,
    student: Annotated[Path | None, typer.Option(help="Student model folder (same tokenizer).")] = None,
    student_layers: Annotated[
        int | None, typer.Option(help="Without --student: keep the teacher's first N layers.")
    ] = None,
    alpha: Annotated[float | None, typer.Option(help="Weight of the KL term; 1 - alpha for CE.")] = None,
    temperature: Annotated[float | None, typer.Option(help="Softmax temperature of the KL term.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Optimizer steps (overrides epochs).")] = None,
    max_samples: Annotated[int | None, typer.Option(help="Use at most this many training texts.")] = None,
    compare_hard_labels: Annotated[
        bool,
        typer.Option(help="Also train the same student on hard labels only and report its held-out loss."),
    ] = True,
    eval_data: EvalData = None,
    eval_samples: EvalSamples = EVAL_SAMPLES,
    eval_seq_len: EvalSeqLen = EVAL_SEQ,
    overwrite: Overwrite = False,
) -> None:
    """Logit distillation (temperature-scaled KL + hard-label CE) with the training backend's loop."""
    from quantize import api
    from train.config import recipe_mapping
    from train.distill import DistillConfig

    def make() -> Manifest:
        settings = recipe_mapping(config) if config else {}
        flags = {
            "teacher": teacher,
            "data": data,
            "student": student,
            "student_layers": student_layers,
            "alpha": alpha,
            "temperature": temperature,
            "max_samples": max_samples,
            "compare_hard_labels": compare_hard_labels,
        }
        settings.update({k: v for k, v in flags.items() if v is not None})
        if max_steps is not None:
            settings["loop"] = {**settings.get("loop", {}), "max_steps": max_steps}
        distill_config = validated(DistillConfig, **settings)
        eval_config = _eval_config(eval_data, eval_samples, eval_seq_len)
        return api.distill(distill_config, output, eval_config=eval_config, overwrite=overwrite)

    _write(output, make)


@app.command("eval")
def eval_(
    model: Model,
    reference: Annotated[
        Path | None, typer.Option(help="Reference model folder: adds mean KL and top-1 agreement.")
    ] = None,
    eval_data: EvalData = None,
    eval_samples: EvalSamples = EVAL_SAMPLES,
    eval_seq_len: EvalSeqLen = EVAL_SEQ,
) -> None:
    """Perplexity on held-out text; against --reference also mean KL and top-1 agreement."""
    from quantize import api

    try:
        eval_config = _eval_config(eval_data, eval_samples, eval_seq_len)
        with _library_output_to_stderr():
            quality: Quality = api.evaluate(model, reference=reference, eval_config=eval_config)
    except StackError as err:
        raise _fail(err) from None
    typer.echo(json.dumps(quality.model_dump(exclude={"eval_data"}, exclude_none=True), indent=2))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
