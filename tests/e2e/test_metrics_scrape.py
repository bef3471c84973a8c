"""`/metrics` of a real server (vLLM engine, tiny model, one LoRA adapter) after streaming and non-streaming
chat and completion requests on the base model and the adapter: every llmstack metric is there, with values
that agree with what clients were told (`usage`) and with each other (TTFT ≤ e2e); promtool checks the
scrape.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from openai.types.chat import ChatCompletionMessageParam
from prometheus_client.parser import text_string_to_metric_families

from tests.support.lora import build_lora_adapter
from tests.support.server import RunningServer, free_port, start_server
from tests.unit.deploy.promql import dashboard_queries, load_dashboard
from tests.unit.deploy.tools import REPO_ROOT, prometheus, promtool

BASE = "tiny"
ADAPTER = "ad1"
MAX_TOKENS = 8
CHAT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Name three colours of the rainbow."}]
PROMPT = "The quick brown fox jumps over"
HISTOGRAMS = (
    "time_to_first_token_seconds",
    "inter_token_latency_seconds",
    "e2e_request_latency_seconds",
    "request_queue_time_seconds",
    "request_prompt_tokens",
    "request_generation_tokens",
)
# Prometheus has scraped the server successfully at least 4 times (rate() needs 2 samples or more).
SCRAPED = 'min_over_time(up{job="llmstack"}[1m]) == 1 and count_over_time(up{job="llmstack"}[1m]) >= 4'
GAUGES = {
    "llmstack:num_requests_running",
    "llmstack:num_requests_waiting",
    "llmstack:kv_cache_usage_perc",
    "llmstack:lora_adapters_loaded",
}
# Every series the lead fixed for the server; histograms by their `_count`.
REQUIRED = {
    "llmstack:http_requests_total",
    "llmstack:api_key_requests_total",
    "llmstack:prompt_tokens_total",
    "llmstack:generation_tokens_total",
    "llmstack:num_requests_running",
    "llmstack:num_requests_waiting",
    "llmstack:kv_cache_usage_perc",
    "llmstack:lora_adapters_loaded",
    *(f"llmstack:{h}_count" for h in HISTOGRAMS),
}


@dataclass
class Traffic:
    """What the clients sent and were told, per served model name."""

    requests: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    prompt_tokens: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    completion_tokens: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))

    def record(self, endpoint: str, model: str, usage: openai.types.CompletionUsage | None) -> None:
        assert usage is not None, f"{endpoint} on {model}: no usage"
        self.requests[endpoint, model] += 1
        self.prompt_tokens[model] += usage.prompt_tokens
        self.completion_tokens[model].append(usage.completion_tokens)


@dataclass
class Scrape:
    text: str
    samples: list[tuple[str, dict[str, str], float]]

    def value(self, name: str, **labels: str) -> float:
        """Sum of the samples named `name` whose labels include `labels`."""
        return sum(
            v for n, lab, v in self.samples if n == name and all(lab.get(k) == x for k, x in labels.items())
        )

    def names(self) -> set[str]:
        return {n for n, _, _ in self.samples}

    def since(self, before: Scrape) -> Scrape:
        """Counters and histograms as their increase since `before`; gauges as they are now."""
        old = {(n, tuple(sorted(lab.items()))): v for n, lab, v in before.samples}
        return Scrape(
            self.text,
            [
                (n, lab, v if n in GAUGES else v - old.get((n, tuple(sorted(lab.items()))), 0.0))
                for n, lab, v in self.samples
            ],
        )

    def buckets(self, name: str, model: str) -> dict[float, float]:
        return {
            float(lab["le"]): v
            for n, lab, v in self.samples
            if n == f"{name}_bucket" and lab.get("model") == model
        }


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("metrics-e2e")
    adapter = build_lora_adapter(tiny_model_dir, root / ADAPTER, seed=7)
    args = ["--served-model-name", BASE, "--max-model-len", "512", "--max-lora-rank", "8"]
    args += ["--lora-modules", f"{ADAPTER}={adapter}"]
    with start_server(tiny_model_dir, *args, log_dir=root / "logs") as running:
        yield running


def drive(server: RunningServer) -> Traffic:
    """Chat and completions, non-streaming and streaming (include_usage), on the base model and adapter."""
    client = openai.OpenAI(base_url=server.openai_url, api_key="unused", max_retries=0, timeout=120)
    traffic = Traffic()
    for model in (BASE, ADAPTER):
        # a field of the client's own, as SDKs add them: ignored and counted (the field policy)
        chat = client.chat.completions.create(
            model=model, messages=CHAT, max_tokens=MAX_TOKENS, extra_body={"x_client_tag": "e2e"}
        )
        traffic.record("/v1/chat/completions", model, chat.usage)
        stream = client.chat.completions.create(
            model=model,
            messages=CHAT,
            max_tokens=MAX_TOKENS,
            stream=True,
            stream_options={"include_usage": True},
        )
        traffic.record("/v1/chat/completions", model, [c for c in stream if c.usage][-1].usage)
        completion = client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS)
        traffic.record("/v1/completions", model, completion.usage)
        stream_c = client.completions.create(
            model=model,
            prompt=PROMPT,
            max_tokens=MAX_TOKENS,
            stream=True,
            stream_options={"include_usage": True},
        )
        traffic.record("/v1/completions", model, [c for c in stream_c if c.usage][-1].usage)
    return traffic


def scrape(server: RunningServer) -> Scrape:
    response = httpx.get(f"{server.url}/metrics", timeout=10, follow_redirects=False)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain"), response.headers["content-type"]
    samples = [
        (s.name, dict(s.labels), s.value)
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    ]
    return Scrape(response.text, samples)


def settled_scrape(server: RunningServer, timeout: float = 10.0) -> Scrape:
    """A scrape taken once no request runs or waits (a stream ends just after the client's last read)."""
    deadline = time.monotonic() + timeout
    while True:
        result = scrape(server)
        idle = result.value("llmstack:num_requests_running") == 0 and (
            result.value("llmstack:num_requests_waiting") == 0
        )
        if idle or time.monotonic() > deadline:
            return result
        time.sleep(0.1)


def test_scrape_after_mixed_traffic(server: RunningServer) -> None:
    before = settled_scrape(server)
    traffic = drive(server)
    after = settled_scrape(server)
    result = after.since(before)  # other tests of this module may have sent requests first

    missing = REQUIRED - after.names()
    assert not missing, f"missing from /metrics: {sorted(missing)}"
    assert result.value("llmstack:num_requests_running") == 0
    assert result.value("llmstack:num_requests_waiting") == 0
    assert result.value("llmstack:lora_adapters_loaded") == 1
    assert 0.0 <= result.value("llmstack:kv_cache_usage_perc") <= 1.0

    for (endpoint, model), count in traffic.requests.items():
        got = result.value("llmstack:http_requests_total", endpoint=endpoint, model=model, status="200")
        assert got == count, (endpoint, model, got, count)
    assert result.value("llmstack:api_key_requests_total", api_key="anonymous") == sum(
        traffic.requests.values()
    )

    for model in (BASE, ADAPTER):
        requests = sum(n for (_, m), n in traffic.requests.items() if m == model)
        prompt, completions = traffic.prompt_tokens[model], traffic.completion_tokens[model]
        label = {"model": model}
        assert result.value("llmstack:prompt_tokens_total", **label) == prompt
        assert result.value("llmstack:generation_tokens_total", **label) == sum(completions)
        assert result.value("llmstack:request_prompt_tokens_sum", **label) == prompt
        assert result.value("llmstack:request_generation_tokens_sum", **label) == sum(completions)
        for histogram in (
            "time_to_first_token_seconds",
            "e2e_request_latency_seconds",
            "request_queue_time_seconds",
        ):
            assert result.value(f"llmstack:{histogram}_count", **label) == requests, (histogram, model)
        for histogram in ("request_prompt_tokens", "request_generation_tokens"):
            assert result.value(f"llmstack:{histogram}_count", **label) == requests, (histogram, model)

        # TTFT ≤ e2e for every request, so TTFT's cumulative buckets dominate e2e's and its sum is smaller.
        ttft = result.buckets("llmstack:time_to_first_token_seconds", model)
        e2e = result.buckets("llmstack:e2e_request_latency_seconds", model)
        assert ttft.keys() == e2e.keys() and ttft[float("inf")] == requests
        assert all(ttft[le] >= e2e[le] for le in ttft), (ttft, e2e)
        ttft_sum = result.value("llmstack:time_to_first_token_seconds_sum", **label)
        e2e_sum = result.value("llmstack:e2e_request_latency_seconds_sum", **label)
        assert 0 < ttft_sum <= e2e_sum
        # Inter-token gaps fall between each request's first and last token.
        itl_count = result.value("llmstack:inter_token_latency_seconds_count", **label)
        itl_sum = result.value("llmstack:inter_token_latency_seconds_sum", **label)
        assert itl_count <= sum(max(c - 1, 0) for c in completions)
        assert itl_sum <= e2e_sum - ttft_sum + 1e-6
        if max(completions) > 1:
            assert itl_count > 0, model

    check_with_promtool(after.text)


def promtool_findings(text: str) -> list[str]:
    """promtool's lint findings on an exposition (exit 3: lint findings; exit 1, a failure here: the text
    does not parse)."""
    result = subprocess.run(
        [str(promtool()), "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    findings = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode in (0, 3), "\n".join(findings)
    assert (result.returncode == 3) == bool(findings)
    return findings


def check_with_promtool(text: str) -> None:
    """The whole scrape parses; the server's own metrics draw no lint finding except that their names contain
    ':' (the `llmstack:` prefix is prescribed, like vLLM's `vllm:`); any other finding is about vLLM's own
    in-process metrics (upstream names, e.g. the histogram `vllm:iteration_tokens_total`)."""
    colon = re.compile(r"\S*:\S* metric names should not contain ':'")
    whole = [f for f in promtool_findings(text) if not colon.fullmatch(f)]
    assert all(f.startswith("vllm:") for f in whole), "\n".join(whole)
    own = "".join(
        line + "\n"
        for line in text.splitlines()
        if line.removeprefix("# HELP ").removeprefix("# TYPE ").startswith("llmstack:")
    )
    assert own.count("# TYPE llmstack:") >= 14
    other = [f for f in promtool_findings(own) if not colon.fullmatch(f)]
    assert not other, "\n".join(other)


def test_prometheus_scrapes_the_server_and_every_dashboard_query_has_data(
    server: RunningServer, tmp_path: Path
) -> None:
    """The real Prometheus (same Debian package as promtool) runs docker/prometheus.yml, pointed at this
    server, scrapes it, and answers every dashboard query with data (5xx ratio aside: no 5xx happened)."""
    drive(server)
    missing_model = httpx.post(
        f"{server.openai_url}/chat/completions", json={"model": "no-such-model", "messages": CHAT}, timeout=30
    )
    assert missing_model.status_code == 404
    port = free_port()
    config = yaml.safe_load((REPO_ROOT / "docker" / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    here = {"server:8000": server.url.removeprefix("http://"), "localhost:9090": f"127.0.0.1:{port}"}
    for job in config["scrape_configs"]:
        for static in job["static_configs"]:
            static["targets"] = [here[t] for t in static["targets"]]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    command = [str(prometheus()), f"--config.file={tmp_path / 'prometheus.yml'}"]
    command += [f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"]
    with (tmp_path / "prometheus.log").open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    api = f"http://127.0.0.1:{port}/api/v1/query"

    def query(expr: str) -> list[dict[str, object]]:
        reply = httpx.get(api, params={"query": expr}, timeout=10)
        reply.raise_for_status()  # a 503 while Prometheus starts: the wait below retries
        body = reply.json()
        assert body["status"] == "success", (expr, body)
        result: list[dict[str, object]] = body["data"]["result"]
        return result

    try:
        deadline = time.monotonic() + 60
        while True:  # rate() needs a few samples of every series
            try:
                if query(SCRAPED):
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "prometheus.log").read_text()[-3000:]
            time.sleep(0.5)
        empty = []
        for path in sorted((REPO_ROOT / "grafana" / "dashboards").glob("*.json")):
            for q in dashboard_queries(load_dashboard(path)):
                if not query(q.expr) and 'status=~"5.."' not in q.expr:
                    empty.append(f"{q.panel}/{q.ref}: {q.expr}")
        assert not empty, "dashboard queries without data:\n" + "\n".join(empty)
        models = {str(r["metric"]["model"]) for r in query("llmstack:http_requests_total")}  # type: ignore[index]
        assert {BASE, ADAPTER} <= models
    finally:
        process.terminate()
        process.wait(30)
