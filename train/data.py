"""Training data: chat records to token ids with an assistant-only target mask, plain texts for distillation,
and right-padded collation.

Invariants:
- A chat record is rendered with the model's own chat template (`core.chat`), tokenized once, and only the
  tokens inside assistant turns (their content and end-of-turn token) are targets; everything else is -100.
- Every bad record (malformed JSON, no assistant turn, too long, invalid messages) is found before training
  starts and reported with its line number; `on_bad="refuse"` raises one `DataError` listing all of them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from core.chat import render_chat, validate_messages
from core.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    """One training sequence: token ids and their targets (-100 where there is none)."""

    input_ids: list[int]
    labels: list[int]


@dataclass
class ChatData:
    examples: list[Example]
    texts: list[str]  # the rendered conversations, for the data digest
    problems: list[str] = field(default_factory=list)


def render_with_mask(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]]
) -> tuple[str, Example]:
    """The conversation's text and its tokens, targets only inside assistant turns.

    Assistant spans are located by rendering growing prefixes of the conversation: the text added by an
    assistant message after the generation prompt of the turns before it is that message's span."""
    validate_messages(messages)
    full = render_chat(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:index], add_generation_prompt=True) if index else ""
        through = render_chat(tokenizer, messages[: index + 1], add_generation_prompt=False)
        if not full.startswith(through) or not through.startswith(before):
            raise DataError("the chat template does not render conversations prefix by prefix")
        end = len(before) + len(through[len(before) :].rstrip())  # no trailing newline after end-of-turn
        spans.append((len(before), end))
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = encoded["input_ids"]
    labels = [
        token if any(lo <= start < hi for lo, hi in spans) else IGNORE_INDEX
        for token, (start, _) in zip(ids, encoded["offset_mapping"], strict=True)
    ]
    return full, Example(ids, labels)


def load_chat_jsonl(
    path: Path,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    on_bad: Literal["skip", "refuse"] = "skip",
) -> ChatData:
    """Read `{"messages": [...]}` records. Bad lines are skipped with a warning naming each, or (refuse)
    all reported in one `DataError`."""
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    data = ChatData([], [])
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            problem = _add_record(data, line, tokenizer, max_length)
            if problem:
                data.problems.append(f"{path}:{number}: {problem}")
    if data.problems:
        if on_bad == "refuse":
            shown = "; ".join(data.problems[:10])
            more = f" (and {len(data.problems) - 10} more)" if len(data.problems) > 10 else ""
            raise DataError(f"{len(data.problems)} bad record(s): {shown}{more}")
        for problem in data.problems:
            log.warning("skipped %s", problem)
    if not data.examples:
        raise DataError(f"{path} holds no usable chat record")
    return data


def _add_record(data: ChatData, line: str, tokenizer: PreTrainedTokenizerBase, max_length: int) -> str | None:
    """Append the record on `line` to `data`, or return why it is unusable."""
    try:
        record: Any = json.loads(line)
    except json.JSONDecodeError as err:
        return f"not valid JSON ({err.msg})"
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        return 'expected an object with a "messages" list'
    messages = record["messages"]
    if not all(isinstance(m, dict) for m in messages):
        return "every message must be an object"
    if not any(m.get("role") == "assistant" for m in messages):
        return "no assistant turn (nothing to learn)"
    try:
        text, example = render_with_mask(tokenizer, messages)
    except DataError as err:
        return str(err)
    if len(example.input_ids) > max_length:
        return f"{len(example.input_ids)} tokens, longer than max_length={max_length}"
    data.examples.append(example)
    data.texts.append(text)
    return None


def tokenize_texts(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int
) -> list[Example]:
    """Plain texts as language-modelling examples (every token is a target), truncated to `max_length`."""
    examples = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]
        if len(ids) >= 2:
            examples.append(Example(ids, list(ids)))
    return examples


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id `collate` pads with: the tokenizer's pad token, else its end-of-sequence token (padding has
    attention 0 and no target, so which token it is never changes a loss)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad_id)


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding has attention 0 and no target."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
