"""Model and tokenizer loading from local folders (never from a hub).

Invariant: every load goes through `resolve_model_dir`, so a missing or non-model path fails with one clear
`ModelLoadError` before any library is asked to guess.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import ModelLoadError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

SUPPORTED_ARCHITECTURES = frozenset(
    {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM"}
)


def resolve_model_dir(path: str | Path) -> Path:
    """The folder of a Hugging Face-format model; refuses anything without a config.json."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise ModelLoadError(
            f"model path {folder} does not exist (models are loaded from local folders only)"
        )
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder} is not a Hugging Face model folder: config.json is missing")
    return folder


def read_config(path: str | Path) -> dict[str, Any]:
    """The model's config.json as a dict."""
    folder = resolve_model_dir(path)
    try:
        config: dict[str, Any] = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"{folder}/config.json is not valid JSON: {err}") from None
    return config


def check_architecture(path: str | Path) -> str:
    """The model's architecture name; refuses architectures the toolchain was not built for."""
    architectures = read_config(path).get("architectures") or []
    supported = [a for a in architectures if a in SUPPORTED_ARCHITECTURES]
    if not supported:
        raise ModelLoadError(
            f"unsupported architecture {architectures or 'unknown'} in {path}; "
            f"supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
        )
    return supported[0]


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The model folder's tokenizer."""
    from transformers import AutoTokenizer

    folder = resolve_model_dir(path)
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load the tokenizer of {folder}: {err}") from None


def load_causal_lm(
    path: str | Path, *, dtype: torch.dtype | str | None = None, device: str | None = None, **kwargs: Any
) -> PreTrainedModel:
    """A causal LM from a local folder, in eval mode. `dtype=None` keeps the checkpoint's dtype."""
    from transformers import AutoModelForCausalLM

    folder = resolve_model_dir(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or "auto", **kwargs)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load the model in {folder}: {err}") from None
    if device is not None:
        model = model.to(device)  # type: ignore[arg-type]
    return model.eval()
