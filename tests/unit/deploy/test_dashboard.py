"""The Grafana dashboard: every PromQL expression parses (promtool, as recording rules) and selects only
series the server exports (names read from `serve.metrics`' registry); wired to the provisioned datasource."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY

from serve import metrics  # noqa: F401  (registers every llmstack metric in the default registry)
from tests.unit.deploy.promql import dashboard_queries, load_dashboard, metric_names, variable_metric_names
from tests.unit.deploy.tools import REPO_ROOT, promtool

DASHBOARDS = sorted((REPO_ROOT / "grafana" / "dashboards").glob("*.json"))
PROVISIONING = REPO_ROOT / "grafana" / "provisioning"


def exported_series_names() -> set[str]:
    """Series names the server's `llmstack:*` metrics expose in the text format, by metric type."""
    names: set[str] = set()
    for family in REGISTRY.collect():
        if not family.name.startswith("llmstack:"):
            continue
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names


def test_there_is_a_dashboard() -> None:
    assert DASHBOARDS, "no grafana/dashboards/*.json"


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ('sum by (le) (rate(a:b_bucket{model=~".*", status="5.."}[1m]))', {"a:b_bucket"}),
        ("histogram_quantile(0.99, sum by (le, model) (rate(x_bucket[5m])))", {"x_bucket"}),
        ("sum(rate(a_total[1m])) / on (job) group_left (model) b", {"a_total", "b"}),
        ('up{job="by"} offset 5m and bool_metric', {"up", "bool_metric"}),
        ("max(llmstack:kv_cache_usage_perc) * 100 > 1e3", {"llmstack:kv_cache_usage_perc"}),
    ],
)
def test_metric_names_of_an_expression(expr: str, expected: set[str]) -> None:
    assert metric_names(expr) == expected


def test_exported_names_cover_the_fixed_list() -> None:
    """The names the lead fixed for the server (serve/metrics.py) are what the registry exposes."""
    fixed = {
        "llmstack:http_requests_total", "llmstack:api_key_requests_total",
        "llmstack:time_to_first_token_seconds_bucket", "llmstack:inter_token_latency_seconds_bucket",
        "llmstack:e2e_request_latency_seconds_bucket", "llmstack:request_queue_time_seconds_bucket",
        "llmstack:request_prompt_tokens_bucket", "llmstack:request_generation_tokens_bucket",
        "llmstack:prompt_tokens_total", "llmstack:generation_tokens_total",
        "llmstack:num_requests_running", "llmstack:num_requests_waiting",
        "llmstack:kv_cache_usage_perc", "llmstack:lora_adapters_loaded", "llmstack:engine_restarts_total",
    }  # fmt: skip
    assert fixed <= exported_series_names()


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_uses_only_exported_names(path: Path) -> None:
    dashboard = load_dashboard(path)
    exported = exported_series_names()
    unknown = {
        f"{q.panel}/{q.ref}: {name}"
        for q in dashboard_queries(dashboard)
        for name in metric_names(q.expr)
        if name not in exported
    }
    unknown |= {f"variable: {name}" for name in variable_metric_names(dashboard) if name not in exported}
    assert not unknown, f"dashboard selects series the server does not export: {sorted(unknown)}"


def test_dashboards_show_every_exported_metric() -> None:
    """No exported llmstack metric is left off the dashboards (a histogram counts via any of its series)."""
    used = {
        n
        for path in DASHBOARDS
        for q in dashboard_queries(load_dashboard(path))
        for n in metric_names(q.expr)
    }
    base = {n.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count") for n in used}
    missing = {
        name
        for name in exported_series_names()
        if name not in used
        and name.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count") not in base
    }
    assert not missing, f"exported but on no dashboard: {sorted(missing)}"


def test_latency_panels_have_p50_p95_p99() -> None:
    queries = [q for path in DASHBOARDS for q in dashboard_queries(load_dashboard(path))]
    for metric in ("time_to_first_token", "inter_token_latency", "e2e_request_latency"):
        quantiles = {
            q.expr.split(",")[0].removeprefix("histogram_quantile(")
            for q in queries
            if q.expr.startswith("histogram_quantile(") and f"llmstack:{metric}_seconds_bucket" in q.expr
        }
        assert quantiles == {"0.5", "0.95", "0.99"}, (metric, quantiles)


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_promtool_accepts_every_expression_as_a_recording_rule(path: Path, tmp_path: Path) -> None:
    queries = list(dashboard_queries(load_dashboard(path)))
    rules = {
        "groups": [
            {
                "name": path.stem,
                "rules": [
                    {"record": f"dashboard:panel{i}:{q.ref.lower()}", "expr": q.expr}
                    for i, q in enumerate(queries)
                ],
            }
        ]
    }
    rule_file = tmp_path / "dashboard-rules.yml"
    rule_file.write_text(yaml.safe_dump(rules, sort_keys=False))
    result = subprocess.run(
        [str(promtool()), "check", "rules", str(rule_file)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout


def test_promtool_rejects_a_broken_expression(tmp_path: Path) -> None:
    """The check above can fail: promtool refuses PromQL that does not parse."""
    rule_file = tmp_path / "bad.yml"
    bad = {"groups": [{"name": "bad", "rules": [{"record": "x:y", "expr": "sum by (le (rate(a[1m]))"}]}]}
    rule_file.write_text(yaml.safe_dump(bad))
    result = subprocess.run(
        [str(promtool()), "check", "rules", str(rule_file)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0


def test_dashboard_is_provisioned_with_its_datasource() -> None:
    datasources = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())["datasources"]
    uids = {d["uid"] for d in datasources if d["type"] == "prometheus"}
    assert any(d["url"] == "http://prometheus:9090" for d in datasources)
    for path in DASHBOARDS:
        dashboard = load_dashboard(path)
        panels = dashboard["panels"]
        used = {p["datasource"]["uid"] for p in panels} | {
            t["datasource"]["uid"] for p in panels for t in p.get("targets", [])
        }
        assert used <= uids, (path.name, used, uids)
    providers = yaml.safe_load((PROVISIONING / "dashboards" / "llmstack.yml").read_text())["providers"]
    assert [p["options"]["path"] for p in providers] == ["/var/lib/grafana/dashboards"]
