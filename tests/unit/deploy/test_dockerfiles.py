"""The Dockerfiles: hadolint-clean, built from the same locks as the Makefile, every COPY source present in
the build context (.dockerignore lets it in), non-root, healthchecked on /ready."""

from __future__ import annotations

import fnmatch
import re
import subprocess
from pathlib import Path

import pytest

from tests.unit.deploy.tools import REPO_ROOT, hadolint

DOCKERFILES = sorted((REPO_ROOT / "docker").glob("Dockerfile*"))
SERVING = [p for p in DOCKERFILES if p.name in ("Dockerfile.cpu", "Dockerfile.cuda")]


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def dockerignore_allows(relative: str) -> bool:
    """Docker's rule: the last matching .dockerignore pattern wins (`!` re-includes); a directory pattern
    covers everything under it."""
    allowed = True
    for raw in (REPO_ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").rstrip("/")
        parts = relative.split("/")
        if pattern.startswith("**/"):  # any component, at any depth
            hit = any(fnmatch.fnmatchcase(part, pattern[3:]) for part in parts)
        else:  # the path or one of its parent folders
            hit = any(fnmatch.fnmatchcase("/".join(parts[: i + 1]), pattern) for i in range(len(parts)))
        if hit:
            allowed = negate
    return allowed


def test_there_are_the_three_images() -> None:
    assert {p.name for p in DOCKERFILES} == {"Dockerfile.cpu", "Dockerfile.cuda", "Dockerfile.toolchain"}


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(path: Path) -> None:
    result = subprocess.run(
        [str(hadolint()), "--no-color", "--failure-threshold", "style", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for line in path.read_text().splitlines():
        if "hadolint ignore=" in line:  # an ignored rule must say why on the same line
            assert re.search(r"ignore=[\w,]+\s+\S", line), f"unjustified: {line}"


def test_hadolint_finds_problems() -> None:
    """The lint above can fail: an unpinned apt install and a root user are reported."""
    bad = "FROM debian:bookworm\nRUN apt-get update && apt-get install -y curl\n"
    result = subprocess.run(
        [str(hadolint()), "--no-color", "-"], input=bad, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "DL3008" in result.stdout


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_copy_sources_exist_and_are_in_the_build_context(path: Path) -> None:
    for word, args in instructions(path):
        if word != "COPY" or "--from=" in args:
            continue
        *sources, _dest = args.split()
        for source in sources:
            assert (REPO_ROOT / source).exists(), f"{path.name}: COPY {source}: no such path"
            assert dockerignore_allows(source), f"{path.name}: COPY {source} is excluded by .dockerignore"


def test_dockerignore_keeps_local_state_out() -> None:
    for local in (
        ".git",
        ".venv/serve-cpu",
        ".cache/tools",
        "tests/conftest.py",
        "serve/__pycache__/app.cpython-311.pyc",
        "core/__pycache__",
    ):
        assert not dockerignore_allows(local), local
    assert dockerignore_allows("serve/app.py")


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_runs_as_a_numeric_non_root_user(path: Path) -> None:
    users = [args for word, args in instructions(path) if word == "USER"]
    assert users, "no USER: the image would run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, users[-1]


def test_cpu_image_installs_the_makefile_lock() -> None:
    """The CPU image installs the same lock the same way as `make` builds .venv/serve-cpu."""
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert "SERVE_REQS := requirements/serve-cpu.lock" in makefile
    runs = [args for word, args in instructions(REPO_ROOT / "docker" / "Dockerfile.cpu") if word == "RUN"]
    assert any("pip install --no-deps -r requirements/serve-cpu.lock" in r for r in runs)
    assert any("pip install --no-deps --no-build-isolation ." in r for r in runs)
    cuda = [args for word, args in instructions(REPO_ROOT / "docker" / "Dockerfile.cuda") if word == "RUN"]
    assert any("-r requirements/serve-cuda.in" in r for r in cuda)


@pytest.mark.parametrize("path", SERVING, ids=lambda p: p.name)
def test_serving_images_check_readiness(path: Path) -> None:
    steps = instructions(path)
    checks = [args for word, args in steps if word == "HEALTHCHECK"]
    assert len(checks) == 1 and "llmstack-healthcheck" in checks[0]
    assert ("COPY", "docker/healthcheck.py /usr/local/bin/llmstack-healthcheck") in steps
    env = " ".join(args for word, args in steps if word == "ENV")
    assert "LLMSTACK_HOST=0.0.0.0" in env and "LLMSTACK_PORT=8000" in env
    assert ("ENTRYPOINT", '["serve"]') in steps
