"""`train` command line: a thin typer layer over train.lora, train.distill, train.qat and train.memory.

Invariant: every user error surfaces as one `error: ...` line on stderr and exit status 2.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from accelerate import PartialState
from pydantic import BaseModel

from core.errors import ConfigError, StackError
from core.models import read_config
from train.config import LoraRecipe, load_recipe
from train.memory import estimate_memory, format_estimate

R = TypeVar("R", bound=BaseModel)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="LoRA fine-tuning, distillation and quantization-aware training.",
)

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="Recipe YAML (see train/recipes/).")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint.")]
WorkOpt = Annotated[Path | None, typer.Option(help="Checkpoints and logs (default: <output>.work).")]
OverwriteOpt = Annotated[bool, typer.Option(help="Replace an existing output.")]
CheckpointingOpt = Annotated[
    bool | None,
    typer.Option(
        "--gradient-checkpointing/--no-gradient-checkpointing",
        help="Recompute activations in the backward (less memory, more compute). "
        "Default: the recipe's loop.gradient_checkpointing, else off.",
    ),
]


def _with_checkpointing(recipe: R, gradient_checkpointing: bool | None) -> R:
    """`recipe` with the flag's loop.gradient_checkpointing, when the flag was given."""
    if gradient_checkpointing is None:
        return recipe
    loop = recipe.loop.model_copy(update={"gradient_checkpointing": gradient_checkpointing})  # type: ignore[attr-defined]
    return recipe.model_copy(update={"loop": loop})


def _echo_result(result: BaseModel) -> None:
    """Print a run's result as JSON on stdout, once: only the main process of a multi-process launch."""
    if PartialState().is_main_process:
        typer.echo(result.model_dump_json(indent=2))


@app.command()
def lora(
    model: Annotated[Path, typer.Option(help="Base model folder.")],
    data: Annotated[Path, typer.Option(help='Chat records, one {"messages": [...]} per line.')],
    output: Annotated[Path, typer.Option(help="Adapter artifact folder to write.")],
    config: ConfigOpt = None,
    eval_data: Annotated[Path | None, typer.Option(help="Held-out chat records.")] = None,
    work_dir: WorkOpt = None,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    gradient_checkpointing: CheckpointingOpt = None,
) -> None:
    """Fine-tune a LoRA adapter (loss on assistant tokens only) and write it as a `lora` artifact."""
    from train.lora import train_lora

    recipe = _with_checkpointing(load_recipe(config, LoraRecipe), gradient_checkpointing)
    result = train_lora(
        model,
        data,
        output,
        recipe,
        eval_data=eval_data,
        work_dir=work_dir,
        resume=resume,
        overwrite=overwrite,
    )
    _echo_result(result)


@app.command()
def distill(
    teacher: Annotated[Path, typer.Option(help="Teacher model folder.")],
    output: Annotated[Path, typer.Option(help="Student model folder to write.")],
    config: ConfigOpt = None,
    student: Annotated[Path | None, typer.Option(help="Student model folder.")] = None,
    student_layers: Annotated[
        int | None, typer.Option(help="Build the student from N teacher layers.")
    ] = None,
    compare_hard_labels: Annotated[
        bool | None,
        typer.Option(
            "--compare-hard-labels/--no-compare-hard-labels",
            help="Also train the same student on hard labels only and report its held-out loss. "
            "Default: the recipe's compare_hard_labels, else off.",
        ),
    ] = None,
    work_dir: WorkOpt = None,
    resume: ResumeOpt = False,
    gradient_checkpointing: CheckpointingOpt = None,
) -> None:
    """Distil a teacher into a smaller student (plain model folder; `quantize distill` adds the manifest);
    flags override the recipe's settings."""
    from train.distill import distill as run_distill
    from train.distill import distill_config

    flags = {
        "teacher": teacher,
        "student": student,
        "student_layers": student_layers,
        "compare_hard_labels": compare_hard_labels,
        "work_dir": work_dir,
        "resume": resume,
        "loop": {"gradient_checkpointing": gradient_checkpointing},
    }
    if output.exists() and any(output.iterdir()):
        raise ConfigError(f"output {output} already exists and is not empty")
    settings = distill_config(config, flags, defaults={"work_dir": output.parent / f"{output.name}.work"})
    result = run_distill(settings, output)
    _echo_result(result)


@app.command()
def qat(
    model: Annotated[Path, typer.Option(help="Model folder to quantize (full precision).")],
    data: Annotated[str, typer.Option(help="Training text: a .txt/.jsonl file or builtin:pydoc-topics.")],
    output: Annotated[Path, typer.Option(help="QAT artifact folder to write (compressed-tensors W4A16).")],
    config: ConfigOpt = None,
    work_dir: WorkOpt = None,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    gradient_checkpointing: CheckpointingOpt = None,
) -> None:
    """Quantization-aware training: fine-tune through fake-quantized weights (STE, learned group scales),
    then write a compressed-tensors artifact that `serve` loads, with its measured quality."""
    from train.qat import QatRecipe, train_qat

    recipe = _with_checkpointing(load_recipe(config, QatRecipe), gradient_checkpointing)
    result = train_qat(model, data, output, recipe, work_dir=work_dir, resume=resume, overwrite=overwrite)
    _echo_result(result)


@app.command("estimate-memory")
def estimate_memory_cmd(
    model: Annotated[Path, typer.Option(help="Model folder (only config.json is read).")],
    method: Annotated[str, typer.Option(help="lora or full.")] = "lora",
    seq_len: Annotated[int, typer.Option(min=1)] = 512,
    batch: Annotated[int, typer.Option(min=1)] = 1,
    lora_rank: Annotated[int, typer.Option(min=1)] = 8,
    gradient_checkpointing: Annotated[
        bool, typer.Option(help="Predict a run with gradient checkpointing (`predicted` in the output).")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (bytes).")] = False,
) -> None:
    """Estimate training memory: weights, gradients, optimizer states, activations, logits, KV cache."""
    if method not in ("lora", "full"):
        raise ConfigError(f"--method must be lora or full, got {method!r}")
    estimate = estimate_memory(
        read_config(model),
        method=method,  # type: ignore[arg-type]
        seq_len=seq_len,
        batch=batch,
        lora_rank=lora_rank,
    )
    predicted = estimate.predicted(gradient_checkpointing=gradient_checkpointing)
    if as_json:
        typer.echo(json.dumps({**estimate.as_dict(), "predicted": predicted}, indent=2))
    else:
        typer.echo(f"{format_estimate(estimate)}\n{'predicted (MiB)':<26}{predicted / 2**20:>14.1f}")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        app(standalone_mode=False)
    except StackError as err:
        typer.echo(f"error: {err}", err=True)
        raise SystemExit(2) from None
    except (typer.Abort, KeyboardInterrupt):
        raise SystemExit(130) from None
    except Exception as err:
        import click

        if isinstance(err, click.ClickException):
            err.show()
            raise SystemExit(err.exit_code) from None
        raise


if __name__ == "__main__":
    main()
