"""A fixed, seeded prompt set for load tests, built offline from the project's built-in corpus.

Invariant: `build_prompts(n, seed)` returns the same prompts on every machine (no hub, no network): paragraphs
of Python's own `pydoc_data.topics` (held-out split), sampled and cut by `random.Random(seed)`.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from core.textdata import builtin_texts

INSTRUCTIONS = (
    "Summarise the following text.",
    "Explain the following text to a beginner.",
    "List the key ideas of the following text.",
    "Rewrite the following text in plain English.",
)


@dataclass(frozen=True)
class Prompt:
    """One benchmark prompt: `text` for /v1/completions and `messages` for /v1/chat/completions."""

    text: str

    @property
    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.text}]


def build_prompts(n: int, seed: int = 0, min_words: int = 16, max_words: int = 96) -> list[Prompt]:
    """`n` prompts: an instruction, then a slice of `min_words`..`max_words` words of a paragraph."""
    if n < 1:
        raise ValueError("n must be >= 1")
    if not 1 <= min_words <= max_words:
        raise ValueError("need 1 <= min_words <= max_words")
    rng = random.Random(seed)
    paragraphs = [p.split() for p in builtin_texts("heldout")]
    prompts = []
    for _ in range(n):
        words = rng.choice(paragraphs)
        length = min(len(words), rng.randint(min_words, max_words))
        start = rng.randint(0, len(words) - length)
        body = " ".join(words[start : start + length])
        prompts.append(Prompt(f"{rng.choice(INSTRUCTIONS)}\n\n{body}"))
    return prompts


def prompts_digest(prompts: list[Prompt]) -> str:
    """Short digest of a prompt set, printed with results so runs can be matched."""
    digest = hashlib.sha256()
    for prompt in prompts:
        digest.update(prompt.text.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:12]
