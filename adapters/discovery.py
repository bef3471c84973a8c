"""Where adapters come from: `name=path` specs, a directory of PEFT adapter folders, or a YAML registry file.

Invariant: every source yields `AdapterSpec`s with validated names and absolute paths; `collect` refuses a
name given twice (naming both places) and reports all problems of all sources together.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import yaml
from pydantic import Field, ValidationError

from core.config import StrictModel, describe_validation_error
from core.errors import ConfigError

ADAPTER_CONFIG = "adapter_config.json"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"


class AdapterSpec(StrictModel, frozen=True):
    """One adapter to serve: the `model` name clients use, and its PEFT folder."""

    name: str = Field(pattern=NAME_PATTERN, description="The name clients pass as `model`.")
    path: Path = Field(description="Folder with adapter_config.json and the adapter weights.")
    source: str = Field(default="", exclude=True, description="Where the spec came from (for messages).")


class RegistryFile(StrictModel):
    """The YAML registry file: `adapters: [{name: ..., path: ...}, ...]`; relative paths are relative to
    the file's folder."""

    adapters: list[AdapterSpec] = Field(default_factory=list)


def parse_spec(spec: str, source: str = "--lora-modules") -> AdapterSpec:
    """`name=path` → spec (the path is made absolute)."""
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise ConfigError(f"{source}: expected name=path, got {spec!r}")
    return _spec(name.strip(), Path(path.strip()).expanduser().resolve(), source)


def discover_directory(folder: Path) -> list[AdapterSpec]:
    """One spec per sub-folder of `folder` holding an adapter_config.json, named after the sub-folder."""
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise ConfigError(f"adapter directory {folder} does not exist")
    return [
        _spec(child.name, child, str(folder))
        for child in sorted(folder.iterdir())
        if (child / ADAPTER_CONFIG).is_file()
    ]


def read_registry_file(path: Path) -> list[AdapterSpec]:
    """The specs of a YAML registry file."""
    path = Path(path).expanduser().resolve()
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read adapter registry {path}: {err}") from None
    if isinstance(raw, dict):
        for item in raw.get("adapters") or []:
            if isinstance(item, dict) and "path" in item:
                item["path"] = str((path.parent / Path(str(item["path"])).expanduser()).resolve())
                item["source"] = str(path)
    try:
        return RegistryFile.model_validate(raw).adapters
    except ValidationError as err:
        problems = describe_validation_error(err, top_level="file")
        raise ConfigError(f"adapter registry {path} is invalid: {problems}") from None


def collect(
    specs: Iterable[str] = (), directories: Iterable[Path] = (), registry_files: Iterable[Path] = ()
) -> list[AdapterSpec]:
    """All adapters of all sources, in order (specs, directories, files); problems reported together."""
    found: list[AdapterSpec] = []
    problems: list[str] = []
    loaders = [
        *((lambda spec=spec: [parse_spec(spec)]) for spec in specs),
        *((lambda folder=folder: discover_directory(folder)) for folder in directories),
        *((lambda file=file: read_registry_file(file)) for file in registry_files),
    ]
    for load in loaders:
        try:
            found.extend(load())
        except ConfigError as err:
            problems.append(str(err))
    seen: dict[str, AdapterSpec] = {}
    for spec in found:
        if spec.name in seen:
            problems.append(
                f"adapter name {spec.name!r} given twice ({seen[spec.name].source}, {spec.source})"
            )
        seen[spec.name] = spec
    if problems:
        raise ConfigError("; ".join(problems))
    return found


def _spec(name: str, path: Path, source: str) -> AdapterSpec:
    try:
        return AdapterSpec(name=name, path=path, source=source)
    except ValidationError:
        raise ConfigError(
            f"{source}: invalid adapter name {name!r} (letters, digits and . _ : - only, at most 128)"
        ) from None
