"""Artifact folders: what vLLM/transformers load as-is, plus `artifact.json`, the manifest.

Invariants:
- An artifact folder appears at its destination complete or not at all: it is built in a temporary sibling
  folder and renamed into place; an exception removes the temporary folder.
- `artifact.json` lists the sha256 of every other file in the folder; `verify_artifact` refuses a folder
  with a missing, extra or altered file and names the first one (in sorted order).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError

from core.config import StrictModel, describe_validation_error
from core.errors import ArtifactError

MANIFEST_NAME = "artifact.json"
SCHEMA_VERSION = 1
_CHUNK = 1 << 20

ArtifactKind = Literal["awq", "gptq", "rtn", "nf4", "qat", "merged", "distilled", "lora", "base"]


class SourceModel(StrictModel):
    """The model an artifact was made from."""

    path: str = Field(description="Where the source was read from (path or name).")
    digest: str = Field(description="sha256 over the source folder's file digests (see `folder_digest`).")


class DataInfo(StrictModel):
    """Data used to make an artifact (calibration, training or distillation text)."""

    name: str = Field(description="File path or built-in corpus name.")
    digest: str = Field(description="sha256 of the samples as used (see `texts_digest`).")
    num_samples: int = Field(ge=0)
    num_tokens: int | None = Field(default=None, ge=0)


class Quality(StrictModel):
    """Measured quality on held-out text. `None` means not measured (never a guess)."""

    eval_data: DataInfo | None = None
    perplexity_source: float | None = Field(default=None, description="Perplexity of the source model.")
    perplexity: float | None = Field(default=None, description="Perplexity of this artifact.")
    mean_kl: float | None = Field(default=None, description="Mean KL(source || artifact) per token.")
    top1_agreement: float | None = Field(default=None, ge=0, le=1)
    extra: dict[str, float] = Field(
        default_factory=dict, description="Method-specific figures (eval loss...)."
    )


class ManifestDraft(StrictModel):
    """What a producer knows; `write_artifact` adds the schema version, time and file digests."""

    kind: ArtifactKind
    source: SourceModel | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: DataInfo | None = None
    quality: Quality = Field(default_factory=Quality)
    tool_versions: dict[str, str] = Field(default_factory=dict)


class Manifest(ManifestDraft):
    """The content of `artifact.json`."""

    schema_version: int = SCHEMA_VERSION
    created_at: datetime
    files: dict[str, str] = Field(description="sha256 of every file in the folder, by relative POSIX path.")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _listed_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST_NAME
    )


def file_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` except the manifest, keyed by sorted relative POSIX path."""
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in _listed_files(folder)}


def folder_digest(folder: Path) -> str:
    """One digest for a model folder. Uses the manifest's recorded digests when the folder is an artifact
    (cheap for big models), otherwise hashes every file."""
    manifest_path = folder / MANIFEST_NAME
    digests = read_manifest(folder).files if manifest_path.exists() else file_digests(folder)
    lines = "".join(f"{name}\0{sha}\n" for name, sha in sorted(digests.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def texts_digest(texts: Iterable[str]) -> str:
    """sha256 over a sequence of text samples, order-sensitive and unambiguous about boundaries."""
    digest = hashlib.sha256()
    for text in texts:
        encoded = text.encode()
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    return digest.hexdigest()


def tool_versions(*distributions: str) -> dict[str, str]:
    """Installed versions of the named distributions (absent ones are skipped)."""
    versions: dict[str, str] = {}
    for name in distributions:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def check_destination(dest: Path, *, overwrite: bool) -> None:
    """Fail early, before any work, if `dest` cannot receive an artifact."""
    if dest.exists() and not overwrite:
        raise ArtifactError(f"output {dest} already exists (pass --overwrite to replace it)")
    if dest.exists() and not dest.is_dir():
        raise ArtifactError(f"output {dest} exists and is not a folder")


def write_artifact(
    dest: Path, populate: Callable[[Path], ManifestDraft], *, overwrite: bool = False
) -> Manifest:
    """Build an artifact atomically.

    `populate(tmp)` writes the model files into the empty temporary folder `tmp` and returns the manifest
    draft. The digests of what it wrote are recorded, the manifest is written, and the folder is renamed to
    `dest`. On any exception nothing is left behind and an existing `dest` is untouched.
    """
    dest = Path(dest)
    check_destination(dest, overwrite=overwrite)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        draft = populate(tmp)
        manifest = Manifest(**draft.model_dump(), created_at=datetime.now(UTC), files=file_digests(tmp))
        _write_json_atomic(tmp / MANIFEST_NAME, manifest.model_dump(mode="json"))
        _replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _replace_dir(src: Path, dest: Path) -> None:
    if not dest.exists():
        os.rename(src, dest)
        return
    trash = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(dest, trash)
    try:
        os.rename(src, dest)
    except BaseException:
        os.rename(trash, dest)
        raise
    shutil.rmtree(trash, ignore_errors=True)


def _write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_manifest(folder: Path) -> Manifest:
    """Parse `folder/artifact.json`; a missing or malformed manifest is an `ArtifactError`."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(f"{folder} has no {MANIFEST_NAME}: not an artifact folder")
    try:
        return Manifest.model_validate_json(path.read_text())
    except ValidationError as err:
        raise ArtifactError(f"{path} is malformed: {describe_validation_error(err, limit=1)}") from None


def verify_artifact(folder: Path) -> Manifest:
    """Check every file of `folder` against its manifest; raise `ArtifactError` naming the first mismatch."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    present = {p.relative_to(folder).as_posix(): p for p in _listed_files(folder)}
    for name in sorted(set(manifest.files) | set(present)):
        if name not in present:
            raise ArtifactError(f"artifact {folder} is corrupt: file {name} is missing")
        if name not in manifest.files:
            raise ArtifactError(f"artifact {folder} is corrupt: file {name} is not in the manifest")
        actual = sha256_file(present[name])
        if actual != manifest.files[name]:
            raise ArtifactError(
                f"artifact {folder} is corrupt: file {name} has sha256 {actual[:12]}…, "
                f"manifest says {manifest.files[name][:12]}…"
            )
    return manifest


def update_manifest(folder: Path, **changes: Any) -> Manifest:
    """Rewrite fields of an existing artifact's manifest (for example quality measured after writing),
    keeping file digests. The folder must verify first."""
    manifest = verify_artifact(folder)
    updated = manifest.model_copy(update=changes)
    Manifest.model_validate(updated.model_dump())
    _write_json_atomic(Path(folder) / MANIFEST_NAME, updated.model_dump(mode="json"))
    return updated
