"""The embedded SmolLM2 model converts once into a plain HF folder; a second call reuses it."""

from __future__ import annotations

from core.artifact import read_manifest, verify_artifact
from core.default_model import default_model_dir, ensure_default_model
from core.models import load_tokenizer, read_config


def test_conversion_is_idempotent_and_verifies() -> None:
    folder = ensure_default_model()
    assert folder == default_model_dir()
    first = read_manifest(folder)
    again = ensure_default_model()
    assert again == folder
    assert read_manifest(folder).created_at == first.created_at, "second call must not convert again"
    verify_artifact(folder)
    config = read_config(folder)
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 30
    tokenizer = load_tokenizer(folder)
    assert tokenizer.eos_token == "<|im_end|>"
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
