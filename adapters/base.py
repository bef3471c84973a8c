"""The served base model as adapters see it: its identity and the shapes of its linear layers.

Invariant: a profile is built once per server from the model folder without loading weights (the
architecture is instantiated on the meta device), so validating an adapter never touches the engine.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path

from core.artifact import MANIFEST_NAME, folder_digest, read_manifest
from core.errors import ModelLoadError
from core.models import read_config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinearShape:
    in_features: int
    out_features: int


@dataclass
class BaseModelProfile:
    """`name` is the served model name; `aliases` are other names and paths that denote the same model (its
    folder, and for an artifact such as a quantized model, the source it was made from)."""

    name: str
    path: Path
    linear: dict[str, LinearShape]
    aliases: frozenset[str] = frozenset()
    source_digest: str | None = None
    _digest: str | None = field(default=None, repr=False)

    @classmethod
    def from_dir(cls, path: Path, name: str) -> BaseModelProfile:
        path = Path(path).resolve()
        aliases = {name, str(path)}
        source_digest = None
        if (path / MANIFEST_NAME).is_file():
            manifest = read_manifest(path)
            if manifest.source is not None:
                aliases.add(manifest.source.path)
                source_digest = manifest.source.digest
        return cls(name, path, linear_shapes(path), frozenset(aliases), source_digest)

    @property
    def digest(self) -> str:
        """`core.artifact.folder_digest` of the served folder (computed on first use)."""
        if self._digest is None:
            self._digest = folder_digest(self.path)
        return self._digest

    def digests(self) -> set[str]:
        """Digests that identify this model: its own, and its source's if it is a derived artifact."""
        return {self.digest} | ({self.source_digest} if self.source_digest else set())


@functools.lru_cache(maxsize=4)
def linear_shapes(path: Path) -> dict[str, LinearShape]:
    """Every `nn.Linear` of the model in `path` by module name (as in the transformers model), no weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    read_config(path)  # a clear error for a folder that is not a model
    try:
        config = AutoConfig.from_pretrained(path)
        config.__dict__.pop("quantization_config", None)  # shapes of the unquantized architecture
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot build the architecture of {path}: {err}") from None
    return {
        name: LinearShape(module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    }
