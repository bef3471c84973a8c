"""Helpers shared by the serve e2e tests: metric scraping (parsed by prometheus_client's own parser), raw
SSE reading, and the one-turn chat check of a served artifact."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

# Tool parameter schemas of the tool-calling tests (chat tools and the Messages API's tool use).
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "days": {"type": "integer", "minimum": 1, "maximum": 9},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"zone": {"type": "string", "enum": ["UTC", "CET", "PST"]}},
    "required": ["zone"],
    "additionalProperties": False,
}


def scrape(base_url: str) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of `/metrics` as (sample name, labels, value)."""
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    return [
        (s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples
    ]


def metric(
    base_url: str,
    name: str,
    where: Callable[[dict[str, str]], bool] | None = None,
    samples: list[tuple[str, dict[str, str], float]] | None = None,
    **labels: str,
) -> float:
    """The sum of the samples of `name` whose labels include `labels` (and pass `where`); 0 when none."""
    rows = samples if samples is not None else scrape(base_url)
    return sum(
        value
        for sample, found, value in rows
        if sample == name
        and all(found.get(k) == v for k, v in labels.items())
        and (where is None or where(found))
    )


def sse_events(response: httpx.Response) -> list[Any]:
    """Every `data:` payload of a finished SSE response, JSON-decoded except the final `[DONE]`."""
    events: list[Any] = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def check_answers_chat(openai_url: str, prompt: str, max_tokens: int = 8) -> None:
    """The server's first listed model answers one greedy chat turn on `prompt` with generated text."""
    client = openai.OpenAI(base_url=openai_url, api_key="unused", max_retries=0, timeout=60)
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0
    )
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    assert reply.choices[0].message.content
