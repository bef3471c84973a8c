"""A model that really emits reasoning, made here: a LoRA adapter, trained with `train lora` on the default
model (SmolLM2-135M-Instruct), that answers `<think>short reasoning</think>answer`.

vLLM's `<think>` parsers (`deepseek_r1`, `qwen3`, ...) work on token ids and need `<think>` and `</think>` to
be single tokens of the vocabulary. SmolLM2's vocabulary has no such tokens and a LoRA adapter cannot add
rows to the embedding, so the base is the default model's weights with a tokenizer in which two of its
unused added tokens (id 3 `<repo_name>`, id 4 `<reponame>`, never seen in chat) are renamed `<think>` and
`</think>` (and made non-special, so they stay in decoded text). The adapter learns to emit them.

Both folders are cached under the repository's `.cache/test-assets`, keyed by a digest of this module (recipe
and data included), so they are rebuilt when it changes.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import shutil
from pathlib import Path

THINK_TOKENS = {3: "<think>", 4: "</think>"}
CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Japan": "Tokyo",
    "Egypt": "Cairo",
    "Canada": "Ottawa",
    "Peru": "Lima",
    "Kenya": "Nairobi",
    "Norway": "Oslo",
}
RECIPE = {
    "lora": {"rank": 8, "alpha": 16, "dropout": 0.0},
    "data": {"max_length": 96, "heldout_every": 25},
    "loop": {
        "max_steps": 12,
        "batch_size": 4,
        "eval_every": 0,
        "checkpoint_every": 0,
        "progress": False,
        "optim": {"lr": 3e-3, "warmup_steps": 2},
    },
}


def digest() -> str:
    """Changes whenever this module (recipe, data, tokenizer edit) changes."""
    return hashlib.sha256(inspect.getsource(inspect.getmodule(digest)).encode()).hexdigest()[:12]  # type: ignore[arg-type]


def records() -> list[dict[str, object]]:
    """Chats whose answers are `<think>reasoning</think>answer` (capital cities and small sums)."""
    out: list[dict[str, object]] = []
    for country, city in CAPITALS.items():
        answer = f"<think>The capital of {country} is {city}.</think>{city}."
        out.append(_chat(f"What is the capital of {country}?", answer))
    for a in range(2, 7):
        for b in range(1, 4):
            answer = f"<think>{a} plus {b} makes {a + b}.</think>{a + b}."
            out.append(_chat(f"What is {a} plus {b}?", answer))
    return out


def _chat(question: str, answer: str) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def build_base(default_model: Path, out: Path) -> None:
    """The default model's files (weights linked) with `<think>`/`</think>` renamed into its tokenizer."""
    out.mkdir(parents=True)
    for name in os.listdir(default_model):
        if name in ("tokenizer.json", "artifact.json"):
            continue
        src = default_model / name
        if name.endswith(".safetensors"):
            os.symlink(src, out / name)
        else:
            shutil.copy(src, out / name)
    tok = json.loads((default_model / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    for token in tok["added_tokens"]:
        if token["id"] in THINK_TOKENS:
            del vocab[token["content"]]
            token["content"] = THINK_TOKENS[token["id"]]
            token["special"] = False
            vocab[token["content"]] = token["id"]
    (out / "tokenizer.json").write_text(json.dumps(tok))


def reasoner(cache_root: Path) -> tuple[Path, Path]:
    """(base folder, adapter folder), built atomically on first use."""
    from core.default_model import ensure_default_model
    from train.config import LoraRecipe
    from train.lora import train_lora

    dest = cache_root / f"reasoner-{digest()}"
    base, adapter = dest / "base", dest / "adapter"
    if (adapter / "adapter_config.json").is_file():
        return base, adapter
    tmp = cache_root / f".reasoner-{digest()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    build_base(Path(ensure_default_model()), tmp / "base")
    data = tmp / "think.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records()))
    train_lora(tmp / "base", data, tmp / "adapter", LoraRecipe.model_validate(RECIPE))
    data.unlink()
    with contextlib.suppress(OSError):  # another process finished first
        tmp.rename(dest)
    shutil.rmtree(tmp, ignore_errors=True)
    return base, adapter
