"""Reasoning: the server's `--reasoning-parser` (a name in vLLM's own `ReasoningParserManager`) splits an
answer into the model's reasoning and the answer after it.

Invariants: without a parser nothing is split (the whole output is content); with one, every character the
engine produced lands in exactly one of the two parts, in order, streamed or not; tool calls and structured
output are read from the content part only (vLLM's structured-output backend itself applies the grammar only
after the reasoning end token when the engine runs with a reasoning parser).
"""

from __future__ import annotations

from typing import Any, cast

from transformers import PreTrainedTokenizerBase

from core.errors import ConfigError


def check_reasoning_parser(name: str, plugin: str = "") -> None:
    """Refuse (at start-up) a `--reasoning-parser` that vLLM does not have: one `ConfigError` line. A
    `--reasoning-parser-plugin` file is imported first (as vLLM does), so it can register the name."""
    from vllm.reasoning import ReasoningParserManager

    if plugin:
        try:
            ReasoningParserManager.import_reasoning_parser(plugin)
        except Exception as err:
            raise ConfigError(f"--reasoning-parser-plugin {plugin!r} cannot be imported: {err}") from None
    if not name:
        return
    known = set(ReasoningParserManager.list_registered())
    if name not in known:
        raise ConfigError(f"--reasoning-parser {name!r} is not one of vLLM's: {', '.join(sorted(known))}")


def check_parser_fits(name: str, tokenizer: PreTrainedTokenizerBase) -> None:
    """Refuse (at start-up) a parser the model's tokenizer cannot serve (e.g. `<think>` is no token)."""
    if not name:
        return
    from vllm.reasoning import ReasoningParserManager

    try:
        ReasoningParserManager.get_reasoning_parser(name)(cast(Any, tokenizer))
    except Exception as err:
        raise ConfigError(f"--reasoning-parser {name!r} cannot read this model's output: {err}") from None


class ReasoningSplit:
    """One output sequence split into (reasoning, content) by vLLM's parser `name`."""

    def __init__(self, name: str, tokenizer: PreTrainedTokenizerBase, template_kwargs: dict[str, Any] | None):
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as VllmRequest
        from vllm.reasoning import ReasoningParserManager

        self._parser = ReasoningParserManager.get_reasoning_parser(name)(cast(Any, tokenizer))
        self._request = VllmRequest.model_validate(
            {
                "model": "-",
                "messages": [{"role": "user", "content": ""}],
                "chat_template_kwargs": template_kwargs or None,
            }
        )
        self._text = ""
        self._ids: list[int] = []

    def feed(self, text: str, token_ids: list[int] | tuple[int, ...]) -> tuple[str, str]:
        """(reasoning, content) of one streamed delta (either may be empty)."""
        previous_text, previous_ids = self._text, self._ids
        self._text = previous_text + text
        self._ids = previous_ids + list(token_ids)
        message = self._parser.extract_reasoning_streaming(
            previous_text, self._text, text, previous_ids, self._ids, list(token_ids)
        )
        if message is None:
            return "", ""
        return message.reasoning or "", message.content or ""

    def split(self, text: str) -> tuple[str | None, str | None]:
        """(reasoning, content) of a finished answer; None where a part is absent."""
        reasoning, content = self._parser.extract_reasoning(text, self._request)
        return reasoning or None, content
