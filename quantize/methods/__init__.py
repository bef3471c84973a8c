"""The quantization methods: one interface (`Writer`), one table (`METHODS`).

Invariant: a method is its artifact kind, its strict config model and one writer per checkpoint format
that config's `format` field admits (checked when the table is built, so the two cannot drift apart). A
writer turns a checked source model folder into a checkpoint that vLLM or transformers loads, inside an
empty output folder. `METHODS` is the only list of methods: `quantize.api.quantize` dispatches on it and
`quantize.cli` makes one command per entry.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from core.artifact import ArtifactKind
from core.errors import ConfigError
from quantize.config import COMPRESSED_TENSORS, AwqConfig, GptqConfig, MethodConfig, Nf4Config, RtnConfig
from quantize.methods import awq, classic, gptq, nf4, rtn

if TYPE_CHECKING:
    from datasets import Dataset

C = TypeVar("C", bound=MethodConfig)
C_contra = TypeVar("C_contra", bound=MethodConfig, contravariant=True)


class Writer(Protocol[C_contra]):
    """Quantize the model folder `source` as `config` says into the empty folder `out`. `calibration` holds
    the tokenized samples of `config.calibration` when the config is a `CalibratedConfig`, else None."""

    def __call__(self, source: Path, out: Path, config: C_contra, calibration: Dataset | None, /) -> None: ...


@dataclass(frozen=True)
class Method(Generic[C]):
    """A quantization method: the artifact kind it writes, its config model, a writer per format."""

    kind: ArtifactKind
    config: type[C]
    writers: Mapping[str, Writer[C]]

    def __post_init__(self) -> None:
        formats = typing.get_args(self.config.model_fields["format"].annotation)
        if set(formats) != set(self.writers):
            raise TypeError(
                f"{self.kind}: {self.config.__name__}.format admits {sorted(formats)}, "
                f"writers exist for {sorted(self.writers)}"
            )

    def writer(self, config: C) -> Writer[C]:
        return self.writers[config.format]


METHODS: Mapping[str, Method[Any]] = {
    method.kind: method
    for method in (
        Method("awq", AwqConfig, {COMPRESSED_TENSORS: awq.quantize, "awq": classic.quantize}),
        Method("gptq", GptqConfig, {COMPRESSED_TENSORS: gptq.quantize, "gptq": classic.quantize}),
        Method("rtn", RtnConfig, {COMPRESSED_TENSORS: rtn.quantize}),
        Method("nf4", Nf4Config, {"bitsandbytes": nf4.quantize}),
    )
}


def method_for(config: MethodConfig) -> Method[Any]:
    """The method `config` configures (by its type)."""
    for method in METHODS.values():
        if type(config) is method.config:
            return method
    raise ConfigError(
        f"{type(config).__name__} is no quantization method's config (known: {', '.join(METHODS)})"
    )
