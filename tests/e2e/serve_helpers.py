"""Helpers shared by the serve e2e tests: metric scraping and raw SSE reading."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx


def metric(base_url: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels` (0 when there is none)."""
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        match = re.match(r"^([^\s{]+)(?:\{(.*)\})?\s+(\S+)$", line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(3))
    return total


def sse_events(response: httpx.Response) -> list[Any]:
    """Every `data:` payload of a finished SSE response, JSON-decoded except the final `[DONE]`."""
    events: list[Any] = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events
