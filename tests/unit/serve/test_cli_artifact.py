"""`serve --model ARTIFACT` verifies the artifact's digests before loading anything."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from core.artifact import ManifestDraft, write_artifact

REPO = Path(__file__).resolve().parents[3]


def test_corrupt_artifact_is_refused_with_exit_2(tiny_model_dir: Path, tmp_path: Path) -> None:
    def populate(out: Path) -> ManifestDraft:
        for item in tiny_model_dir.iterdir():
            if item.is_file() and item.name != "artifact.json":
                shutil.copy2(item, out / item.name)
        return ManifestDraft(kind="base")

    artifact = tmp_path / "artifact"
    write_artifact(artifact, populate)
    with (artifact / "config.json").open("a") as handle:
        handle.write("\n")
    result = subprocess.run(
        [sys.executable, "-m", "serve.cli", "--model", str(artifact)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "is corrupt: file config.json" in result.stderr
    assert result.stderr.strip().count("\n") == 0
