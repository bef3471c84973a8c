"""`quantize`: the toolchain's command line, a thin layer over `quantize.api`.

Invariant: one command per quantization method in `quantize.methods.METHODS`, all made by one factory; a
method's options are its config model's fields (nested models flattened), with the field's description as
help and its default as default, so an option is declared once, in the config. Any user error (a `StackError`,
validation included) prints one line on stderr and exits with status 2, and nothing is written; stdout carries
only the report (what libraries print while a command runs, e.g. gptqmodel's logs, goes to stderr).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import sys
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from core.artifact import Manifest, Quality
from core.errors import StackError
from core.quality import EvalConfig
from quantize.config import MergeLoraConfig, MethodConfig, validated
from quantize.methods import METHODS, Method

app = typer.Typer(
    help="Quantize, merge, distil and evaluate models; every output is a verified artifact folder.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _help(model: type[BaseModel], field: str) -> str:
    return model.model_fields[field].description or ""


Model = Annotated[Path, typer.Option("--model", help="Source model folder (Hugging Face format).")]
Output = Annotated[Path, typer.Option("--output", help="Artifact folder to create.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output folder.")]


def _fail(err: StackError) -> typer.Exit:
    typer.echo(f"error: {err}", err=True)
    return typer.Exit(2)


def _option_type(annotation: Any) -> Any:
    """The command-line type of a config field: bool, int and float as such, text for strings and `Literal`
    choices (pydantic validates them, so a bad value reads like any other config error)."""
    if annotation in (bool, int, float, str):
        return annotation
    if typing.get_origin(annotation) is Literal:
        return str
    if typing.get_origin(annotation) is types.UnionType:
        inner = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(inner) == 1:
            return _option_type(inner[0]) | None
    raise TypeError(f"no command-line option for a config field of type {annotation!r}")


def _fields(
    model: type[BaseModel], prefix: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], FieldInfo]]:
    """Every field of `model` with its path in the model; a nested config model's fields stand for it."""
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from _fields(field.annotation, (*prefix, name))
        else:
            yield (*prefix, name), field


def _option(name: str, field: FieldInfo) -> inspect.Parameter:
    """The command-line option `--name` of a config field: the field's description is its help, the field's
    default its default (none: the option is required)."""
    default = inspect.Parameter.empty if field.is_required() else field.get_default(call_default_factory=True)
    option = Annotated[_option_type(field.annotation), typer.Option(help=field.description)]  # type: ignore[valid-type]
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=option)


def _nested(values: dict[tuple[str, ...], Any]) -> dict[str, Any]:
    """{("calibration", "num_samples"): 8} -> {"calibration": {"num_samples": 8}}."""
    tree: dict[str, Any] = {}
    for path, value in values.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def _config_options(**groups: type[BaseModel]) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Command decorator: each parameter named in `groups` is offered on the command line, in its place, as
    one option per field of its config model (`_fields`, `_option`: the option is named after the field);
    the command receives the validated model; a validation problem is one line on stderr and exit status 2."""

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        signature = inspect.signature(command, eval_str=True)
        fields = {group: list(_fields(model)) for group, model in groups.items()}
        parameters: list[inspect.Parameter] = []
        for parameter in signature.parameters.values():
            if parameter.name in groups:
                parameters += [_option(path[-1], field) for path, field in fields[parameter.name]]
            else:
                parameters.append(parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY))
        names = [parameter.name for parameter in parameters]
        if len(set(names)) != len(names):
            raise TypeError(f"{command.__name__}: an option name stands twice in {names}")

        @functools.wraps(command)
        def run(**values: Any) -> None:
            try:
                configs = {
                    group: validated(
                        model, **_nested({path: values.pop(path[-1]) for path, _ in fields[group]})
                    )
                    for group, model in groups.items()
                }
            except StackError as err:
                raise _fail(err) from None
            command(**values, **configs)

        run.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
        return run

    return decorate


@contextlib.contextmanager
def _library_output_to_stderr() -> Iterator[None]:
    with contextlib.redirect_stdout(sys.stderr):
        yield


def _write(output: Path, make: Callable[[], Manifest]) -> None:
    """Run `make` (whatever libraries print goes to stderr) and report the artifact on stdout; a user error
    is one line on stderr and exit status 2."""
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


@app.callback()
def _setup(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False,
) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(name)s: %(message)s")


def _add_method_command(method: Method[Any]) -> None:
    """`quantize <kind>`: the method's config as options, then `quantize.api.quantize`."""

    @_config_options(config=method.config, eval_config=EvalConfig)
    def command(
        model: Model,
        output: Output,
        config: MethodConfig,
        eval_config: EvalConfig,
        overwrite: Overwrite = False,
    ) -> None:
        from quantize import api

        _write(
            output, lambda: api.quantize(model, output, config, eval_config=eval_config, overwrite=overwrite)
        )

    app.command(method.kind, help=method.config.__doc__)(command)


for _method in METHODS.values():
    _add_method_command(_method)


HardLabelsHelp = (
    "Also train the same student on hard labels only and report its held-out loss. "
    "Default: the recipe's compare_hard_labels, else off."
)


@app.command("merge-lora")
@_config_options(eval_config=EvalConfig)
def merge_lora(
    base: Annotated[Path, typer.Option("--base", help="Full-precision base model folder.")],
    adapter: Annotated[list[Path], typer.Option("--adapter", help=_help(MergeLoraConfig, "adapters"))],
    output: Output,
    weights: Annotated[
        list[float] | None, typer.Option("--weights", help=_help(MergeLoraConfig, "weights"))
    ] = None,
    force: Annotated[bool, typer.Option("--force", help=_help(MergeLoraConfig, "force"))] = False,
    *,
    eval_config: EvalConfig,
    overwrite: Overwrite = False,
) -> None:
    """Merge LoRA adapters (optionally weighted) into the base with PEFT; the output is a plain model."""
    from quantize import api

    def make() -> Manifest:
        config = validated(MergeLoraConfig, adapters=adapter, weights=weights or None, force=force)
        return api.merge_lora(base, output, config, eval_config=eval_config, overwrite=overwrite)

    _write(output, make)


@app.command()
@_config_options(eval_config=EvalConfig)
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
        bool | None, typer.Option("--compare-hard-labels/--no-compare-hard-labels", help=HardLabelsHelp)
    ] = None,
    *,
    eval_config: EvalConfig,
    overwrite: Overwrite = False,
) -> None:
    """Logit distillation (temperature-scaled KL + hard-label CE) with the training backend's loop; flags
    override the recipe's settings."""
    from quantize import api
    from train.distill import distill_config

    def make() -> Manifest:
        flags = {
            "teacher": teacher,
            "data": data,
            "student": student,
            "student_layers": student_layers,
            "alpha": alpha,
            "temperature": temperature,
            "max_samples": max_samples,
            "compare_hard_labels": compare_hard_labels,
            "loop": {"max_steps": max_steps},
        }
        return api.distill(
            distill_config(config, flags), output, eval_config=eval_config, overwrite=overwrite
        )

    _write(output, make)


@app.command("eval")
@_config_options(eval_config=EvalConfig)
def eval_(
    model: Model,
    reference: Annotated[
        Path | None, typer.Option(help="Reference model folder: adds mean KL and top-1 agreement.")
    ] = None,
    *,
    eval_config: EvalConfig,
) -> None:
    """Perplexity on held-out text; against --reference also mean KL and top-1 agreement."""
    from quantize import api

    try:
        with _library_output_to_stderr():
            quality: Quality = api.evaluate(model, reference=reference, eval_config=eval_config)
    except StackError as err:
        raise _fail(err) from None
    typer.echo(json.dumps(quality.model_dump(exclude={"eval_data"}, exclude_none=True), indent=2))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
