"""The package map of docs/ARCHITECTURE.md, checked: which project packages each package may import.

Every import statement is read (module level, inside functions and under TYPE_CHECKING alike), so a
layering break fails here before it becomes a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
PROJECT = ("core", "adapters", "serve", "quantize", "train")
# The one list: docs/ARCHITECTURE.md shows the same table.
MAY_IMPORT = {
    "core": set(),
    "adapters": {"core"},
    "train": {"core"},
    "quantize": {"core", "train"},
    "serve": {"core", "adapters"},
}
# Third-party packages a package must never import (core is shared by the server, the toolchain and the
# trainer, so it carries neither the web framework nor the engine).
FORBIDDEN_THIRD_PARTY = {"core": {"fastapi", "starlette", "uvicorn", "vllm"}}


def imports_of(package: str) -> dict[str, set[str]]:
    """{top-level package imported: files importing it} for every .py file of `package`."""
    found: dict[str, set[str]] = {}
    for path in sorted((REPO / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(REPO)))
    return found


@pytest.mark.parametrize("package", PROJECT)
def test_package_imports_only_what_the_map_allows(package: str) -> None:
    imported = imports_of(package)
    allowed = MAY_IMPORT[package] | {package}
    breaks = {
        name: sorted(files) for name, files in imported.items() if name in PROJECT and name not in allowed
    }
    assert not breaks, f"{package} may import {sorted(MAY_IMPORT[package])} only; found {breaks}"
    bad = {
        name: sorted(files)
        for name, files in imported.items()
        if name in FORBIDDEN_THIRD_PARTY.get(package, ())
    }
    assert not bad, f"{package} must not import {sorted(bad)}: {bad}"


def test_the_map_has_no_cycle() -> None:
    def reaches(start: str, goal: str, seen: frozenset[str] = frozenset()) -> bool:
        return any(
            dep == goal or (dep not in seen and reaches(dep, goal, seen | {dep})) for dep in MAY_IMPORT[start]
        )

    assert not [p for p in PROJECT if reaches(p, p)]


def test_architecture_doc_shows_the_same_map() -> None:
    doc = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    for package, allowed in MAY_IMPORT.items():
        shown = ", ".join(f"`{a}`" for a in sorted(allowed)) or "nothing of the project"
        assert f"| `{package}/` | {shown} |" in doc, f"docs/ARCHITECTURE.md row for {package}"
