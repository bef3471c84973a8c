"""Helpers shared by the serve e2e tests: metric scraping (parsed by prometheus_client's own parser) and raw
SSE reading."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families


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
