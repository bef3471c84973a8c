"""Reading the Grafana dashboard's PromQL: its expressions, with Grafana's variables substituted, and the
metric names each one selects."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Grafana variables → values that make the expression plain PromQL (as Grafana itself would send it).
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h", "$model": ".*"}

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or",
             "unless", "inf", "nan"}  # fmt: skip
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w:.])([A-Za-z_:][\w:]*)(?![\w:])(\s*\()?")


@dataclass(frozen=True)
class Query:
    panel: str
    ref: str
    expr: str


def substitute(expr: str) -> str:
    """`expr` with every Grafana variable replaced (longest names first)."""
    for name in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, GRAFANA_VARIABLES[name])
    return expr


def dashboard_queries(dashboard: dict[str, Any]) -> Iterator[Query]:
    """Every PromQL target of every panel (rows included), variables substituted."""

    def walk(panels: list[dict[str, Any]]) -> Iterator[Query]:
        for panel in panels:
            for target in panel.get("targets", []):
                yield Query(panel.get("title", "?"), target.get("refId", "?"), substitute(target["expr"]))
            yield from walk(panel.get("panels", []))

    yield from walk(dashboard.get("panels", []))


def variable_metric_names(dashboard: dict[str, Any]) -> set[str]:
    """Metric names used by the dashboard's `label_values(metric, label)` variables."""
    names: set[str] = set()
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query or "")
        names.update(re.findall(r"label_values\(\s*([A-Za-z_:][\w:]*)", text))
    return names


def metric_names(expr: str) -> set[str]:
    """Names of the series `expr` selects: identifiers that are not functions, keywords, label names (inside
    `{}`, `by (...)`, ...), strings, numbers or durations."""
    text = _STRING.sub('""', expr)
    text = _LABEL_LIST.sub(" ", text)
    while _MATCHERS.search(text):
        text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in _KEYWORDS:
            continue
        names.add(name)
    return names


def load_dashboard(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data
