"""Adapters for the tiny models, built once per session under a temporary folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapters.base import BaseModelProfile
from tests.support.lora import build_lora_adapter


@pytest.fixture(scope="session")
def adapter_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("unit-adapters")


@pytest.fixture(scope="session")
def good_adapter(tiny_model_dir: Path, adapter_root: Path) -> Path:
    return build_lora_adapter(tiny_model_dir, adapter_root / "good", seed=1)


@pytest.fixture(scope="session")
def wrong_base_adapter(tiny_model_dir_b: Path, adapter_root: Path) -> Path:
    return build_lora_adapter(tiny_model_dir_b, adapter_root / "wrong-base", seed=1)


@pytest.fixture(scope="session")
def profile(tiny_model_dir: Path) -> BaseModelProfile:
    return BaseModelProfile.from_dir(tiny_model_dir, "tiny")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
