"""Fixtures of the train tests: a small synthetic chat data set with a learnable pattern."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

WORDS = [
    "assert", "class", "lambda", "yield", "import", "return", "global", "while", "break", "raise",
    "pass", "with", "async", "await", "try", "except", "finally", "del", "if", "else",
    "elif", "for", "continue", "nonlocal", "from", "as", "not", "and", "or", "is",
    "in", "def", "list", "dict", "tuple", "set", "str", "bytes", "int", "float",
]  # fmt: skip


def chat_records(n: int = 40) -> list[dict]:
    """`n` conversations that share one answer template (learnable by a tiny model in a few steps)."""
    return [
        {
            "messages": [
                {"role": "system", "content": "You answer about Python keywords."},
                {"role": "user", "content": f"Tell me about {word}."},
                {"role": "assistant", "content": f"The keyword {word} is part of Python. Use {word} well."},
            ]
        }
        for word in (WORDS * (n // len(WORDS) + 1))[:n]
    ]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture
def chat_jsonl(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "chat.jsonl", chat_records())


@pytest.fixture(scope="session")
def lm_examples(tiny_model_dir: Path) -> tuple[list, list]:
    """Short language-modelling examples of varied length (train, eval) from the built-in corpus."""
    from core.models import load_tokenizer
    from core.textdata import builtin_texts
    from train.data import tokenize_texts

    tokenizer = load_tokenizer(tiny_model_dir)
    train = tokenize_texts(tokenizer, builtin_texts("train")[:24], 24)
    held = tokenize_texts(tokenizer, builtin_texts("heldout")[:8], 24)
    # varied lengths, so padding and token-count normalisation matter
    train = [
        type(e)(e.input_ids[: 8 + 2 * (i % 8)], e.labels[: 8 + 2 * (i % 8)]) for i, e in enumerate(train)
    ]
    return train, held


@pytest.fixture
def make_task(tiny_model_dir: Path, lm_examples: tuple[list, list]):
    """A factory of fresh full-fine-tuning tasks on the tiny model (same initial weights every time)."""
    import torch

    from core.models import load_causal_lm
    from train.data import collate
    from train.loop import TrainTask, causal_lm_loss_sum

    def factory(loss_fn=causal_lm_loss_sum, **kwargs) -> TrainTask:
        model = load_causal_lm(tiny_model_dir, dtype=torch.float32).train()
        train, held = lm_examples
        return TrainTask(
            model=model,
            loss_fn=loss_fn,
            train_data=train,
            eval_data=held,
            collate=lambda examples: collate(examples, 0),
            **kwargs,
        )

    return factory
