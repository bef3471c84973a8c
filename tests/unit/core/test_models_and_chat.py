from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.chat import CHATML_TEMPLATE, render_chat
from core.errors import DataError, ModelLoadError
from core.models import check_architecture, load_causal_lm, load_tokenizer, resolve_model_dir


def test_tiny_model_loads_and_renders_chatml(tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    assert tokenizer.chat_template == CHATML_TEMPLATE
    prompt = render_chat(
        tokenizer, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    )
    assert (
        prompt
        == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    model = load_causal_lm(tiny_model_dir)
    assert model.config.head_dim == 32
    assert check_architecture(tiny_model_dir) == "LlamaForCausalLM"


def test_bad_messages_are_refused(tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    with pytest.raises(DataError, match="role must be one of"):
        render_chat(tokenizer, [{"role": "wizard", "content": "x"}])
    with pytest.raises(DataError, match="at least one message"):
        render_chat(tokenizer, [])


def test_missing_and_non_model_paths(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_dir(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match=r"config\.json is missing"):
        resolve_model_dir(tmp_path)


def test_unsupported_architecture(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(ModelLoadError, match="unsupported architecture"):
        check_architecture(tmp_path)
