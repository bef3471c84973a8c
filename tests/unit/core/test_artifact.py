from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.artifact import (
    MANIFEST_NAME,
    DataInfo,
    ManifestDraft,
    Quality,
    SourceModel,
    folder_digest,
    read_manifest,
    texts_digest,
    update_manifest,
    verify_artifact,
    write_artifact,
)
from core.errors import ArtifactError


def _populate(tmp: Path) -> ManifestDraft:
    (tmp / "config.json").write_text('{"a": 1}')
    (tmp / "weights").mkdir()
    (tmp / "weights" / "model.safetensors").write_bytes(bytes(range(256)) * 4)
    return ManifestDraft(
        kind="rtn",
        source=SourceModel(path="/models/src", digest="0" * 64),
        parameters={"bits": 4, "group_size": 32},
        data=DataInfo(name="builtin", digest=texts_digest(["a", "b"]), num_samples=2),
        quality=Quality(perplexity_source=10.0, perplexity=10.5),
        tool_versions={"torch": "2.13.0"},
    )


def test_round_trip_records_every_file(tmp_path: Path) -> None:
    dest = tmp_path / "art"
    manifest = write_artifact(dest, _populate)
    assert set(manifest.files) == {"config.json", "weights/model.safetensors"}
    assert verify_artifact(dest) == read_manifest(dest)
    on_disk = json.loads((dest / MANIFEST_NAME).read_text())
    assert on_disk["kind"] == "rtn" and on_disk["schema_version"] == 1
    assert on_disk["parameters"] == {"bits": 4, "group_size": 32}


def test_tampering_one_byte_names_the_file(tmp_path: Path) -> None:
    dest = tmp_path / "art"
    write_artifact(dest, _populate)
    weights = dest / "weights" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[100] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"weights/model\.safetensors"):
        verify_artifact(dest)


def test_missing_and_extra_files_are_refused(tmp_path: Path) -> None:
    dest = tmp_path / "art"
    write_artifact(dest, _populate)
    (dest / "extra.bin").write_bytes(b"x")
    with pytest.raises(ArtifactError, match=r"extra\.bin is not in the manifest"):
        verify_artifact(dest)
    (dest / "extra.bin").unlink()
    (dest / "config.json").unlink()
    with pytest.raises(ArtifactError, match=r"config\.json is missing"):
        verify_artifact(dest)


def test_exception_leaves_nothing_behind(tmp_path: Path) -> None:
    def failing(tmp: Path) -> ManifestDraft:
        (tmp / "half.bin").write_bytes(b"half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        write_artifact(tmp_path / "art", failing)
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_artifact(tmp_path: Path) -> None:
    dest = tmp_path / "art"
    first = write_artifact(dest, _populate)

    def failing(tmp: Path) -> ManifestDraft:
        raise ValueError("bad run")

    with pytest.raises(ValueError):
        write_artifact(dest, failing, overwrite=True)
    assert verify_artifact(dest).files == first.files
    assert [p.name for p in tmp_path.iterdir()] == ["art"]


def test_existing_output_needs_overwrite(tmp_path: Path) -> None:
    dest = tmp_path / "art"
    write_artifact(dest, _populate)
    with pytest.raises(ArtifactError, match="--overwrite"):
        write_artifact(dest, _populate)
    write_artifact(dest, _populate, overwrite=True)
    verify_artifact(dest)


def test_malformed_manifest_is_a_clear_error(tmp_path: Path) -> None:
    dest = tmp_path / "art"
    write_artifact(dest, _populate)
    payload = json.loads((dest / MANIFEST_NAME).read_text())
    payload["kind"] = "banana"
    (dest / MANIFEST_NAME).write_text(json.dumps(payload))
    with pytest.raises(ArtifactError, match="malformed: kind"):
        read_manifest(dest)
    with pytest.raises(ArtifactError, match="not an artifact folder"):
        read_manifest(tmp_path)


def test_update_manifest_keeps_digests(tmp_path: Path) -> None:
    dest = tmp_path / "art"
    write_artifact(dest, _populate)
    updated = update_manifest(dest, quality=Quality(perplexity=9.0))
    assert verify_artifact(dest).quality.perplexity == 9.0
    assert updated.files == read_manifest(dest).files


def test_folder_digest_is_content_addressed(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        folder.mkdir()
        (folder / "f").write_text("same")
    assert folder_digest(a) == folder_digest(b)
    (b / "f").write_text("different")
    assert folder_digest(a) != folder_digest(b)


def test_texts_digest_respects_boundaries() -> None:
    assert texts_digest(["ab", "c"]) != texts_digest(["a", "bc"])
    assert texts_digest(["x"]) == texts_digest(["x"])
