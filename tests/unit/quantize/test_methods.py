"""The method table: one entry per method, a writer for every format its config admits, dispatch by config."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import ConfigError
from quantize import api
from quantize.config import AwqConfig, GptqConfig, MergeLoraConfig, Nf4Config, RtnConfig
from quantize.methods import METHODS, Method, awq, method_for


def test_each_config_selects_its_method() -> None:
    for config in (AwqConfig(), GptqConfig(format="gptq"), RtnConfig(), Nf4Config()):
        method = method_for(config)
        assert method.config is type(config) and METHODS[method.kind] is method
    assert {kind: m.config.__name__ for kind, m in METHODS.items()} == {
        "awq": "AwqConfig", "gptq": "GptqConfig", "rtn": "RtnConfig", "nf4": "Nf4Config"
    }  # fmt: skip


def test_writers_must_match_the_formats_the_config_admits() -> None:
    with pytest.raises(
        TypeError, match=r"admits \['awq', 'compressed-tensors'\], writers exist for \['awq'\]"
    ):
        Method("awq", AwqConfig, {"awq": awq.quantize})


def test_a_config_of_no_method_is_refused_before_any_work(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = MergeLoraConfig(adapters=[tmp_path])
    with pytest.raises(ConfigError, match="MergeLoraConfig is no quantization method's config"):
        api.quantize(tiny_model_dir, tmp_path / "out", config)  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()
