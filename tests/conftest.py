"""Session-wide test setup: offline hub, vLLM CPU settings, cached tiny models, no files left behind."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from serve.engine import cpu_env

REPO_ROOT = Path(__file__).resolve().parent.parent
ASSET_CACHE = REPO_ROOT / ".cache" / "test-assets"

cpu_env.apply_defaults()  # before any test imports transformers or vLLM


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import importlib.util

    has_gpu = False
    if importlib.util.find_spec("torch") is not None:
        import torch

        has_gpu = torch.cuda.is_available()
    for item in items:
        if "slow" in item.keywords and not config.getoption("--run-slow"):
            item.add_marker(pytest.mark.skip(reason="slow: pass --run-slow to run"))
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        for mark in item.iter_markers("cpu_feature"):
            _skip_without_cpu_feature(item, *mark.args)


def _skip_without_cpu_feature(item: pytest.Item, feature: str, why: str) -> None:
    """`@pytest.mark.cpu_feature("avx512_fp16", "why")`: skip, saying so, on a CPU without the feature."""
    from serve.engine import cpu_features

    cpu = cpu_features.probe()
    if not getattr(cpu, feature):
        item.add_marker(pytest.mark.skip(reason=f"needs CPU feature {feature} ({why}); this CPU: {cpu.kind}"))


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """A random-weight tiny Llama with a locally trained BPE tokenizer and ChatML template (cached)."""
    from tests.support.tiny_model import tiny_model

    return tiny_model(ASSET_CACHE, seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir_b() -> Path:
    """A second tiny model, same tokenizer and shapes, different weights (a 'wrong base' for adapters)."""
    from tests.support.tiny_model import tiny_model

    return tiny_model(ASSET_CACHE, seed=1)


def _repo_state() -> set[str]:
    """Untracked, non-ignored paths of the repository (what a leaking test would create)."""
    out = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return {line[3:] for line in out.splitlines() if line.startswith("??")}


@pytest.fixture(autouse=True)
def _no_files_left_behind() -> Iterator[None]:
    """Fail a test that leaves new untracked files in the repository (tests write under tmp_path only)."""
    before = _repo_state()
    yield
    leaked = _repo_state() - before
    if leaked:
        pytest.fail(f"test left files behind in the repository: {sorted(leaked)[:5]}")
