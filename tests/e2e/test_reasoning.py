"""End to end: a model that really reasons (tests/support/reasoner.py: a LoRA adapter trained here with
`train lora` to answer `<think>...</think>answer`) served with `--reasoning-parser deepseek_r1` on the real
engine. The openai SDK reads `reasoning_content` (whole and streamed), Messages returns a `thinking` block
then a `text` block, and a json_schema answer is parsed from after `</think>` (the engine's grammar starts
after the reasoning).

Opt-in (`--run-slow`): on an empty test-asset cache (every fresh CI clone) building the adapter trains for
minutes on 2 cores (4.6 CPU-minutes measured), more than the default suite's time budget allows; the
reasoning split itself is covered in the default suite by tests/unit/serve/test_reasoning.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import ASSET_CACHE
from tests.support.reasoner import reasoner
from tests.support.server import RunningServer, start_server

pytestmark = pytest.mark.slow

ADAPTER = "reasoner"
QUESTION: Any = [{"role": "user", "content": "What is the capital of France?"}]
WHOLE: dict[str, str] = {}  # the non-streamed chat answer, which the other forms must repeat


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    base, adapter = reasoner(ASSET_CACHE)
    args = ["--reasoning-parser", "deepseek_r1", "--lora-modules", f"{ADAPTER}={adapter}"]
    args += ["--max-loras", "1", "--max-lora-rank", "8"]
    with start_server(base, *args, log_dir=tmp_path_factory.mktemp("serve-reasoning")) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def _reasoning(obj: Any) -> str | None:
    """`reasoning_content` as the SDK exposes a field it does not model (attribute or `model_extra`)."""
    return getattr(obj, "reasoning_content", None) or (obj.model_extra or {}).get("reasoning_content")


def test_chat_returns_reasoning_content_and_the_answer(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=ADAPTER, messages=QUESTION, max_tokens=40, temperature=0)
    message = reply.choices[0].message
    reasoning = _reasoning(message)
    assert reasoning and message.content, message
    assert "Paris" in message.content
    assert not any(tag in reasoning + message.content for tag in ("<think>", "</think>"))
    WHOLE.update(reasoning=reasoning, content=message.content)


def test_chat_streams_reasoning_then_content(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=ADAPTER, messages=QUESTION, max_tokens=40, temperature=0, stream=True
    )
    order, reasoning, content = [], [], []
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        if piece := _reasoning(delta):
            reasoning.append(piece)
            order.append("reasoning")
        if delta.content:
            content.append(delta.content)
            order.append("content")
    assert reasoning and content
    if WHOLE:  # greedy: the same answer as the non-streamed one
        assert ("".join(reasoning), "".join(content)) == (WHOLE["reasoning"], WHOLE["content"])
    assert order.index("content") > max(i for i, kind in enumerate(order) if kind == "reasoning")


def test_messages_thinking_block_then_text(server: RunningServer) -> None:
    body = {
        "model": ADAPTER,
        "max_tokens": 2048,
        "temperature": 0,
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "messages": QUESTION,
    }
    reply = httpx.post(f"{server.url}/v1/messages", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    content = reply.json()["content"]
    assert [b["type"] for b in content] == ["thinking", "text"]
    assert content[0]["thinking"] and "Paris" in content[1]["text"]
    if WHOLE:
        assert (content[0]["thinking"], content[1]["text"]) == (WHOLE["reasoning"], WHOLE["content"])


def test_structured_output_is_parsed_from_the_answer_after_the_reasoning(client: openai.OpenAI) -> None:
    cities = ["Paris", "Berlin", "Rome"]
    schema: Any = {"type": "object", "properties": {"city": {"enum": cities}}, "required": ["city"]}
    reply = client.chat.completions.create(
        model=ADAPTER,
        messages=QUESTION,
        max_tokens=60,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
    )
    message = reply.choices[0].message
    assert _reasoning(message)  # the reasoning was free text, not forced into the schema
    assert json.loads(message.content or "")["city"] in cities
