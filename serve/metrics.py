"""Every metric the server exports, by name (the Grafana dashboard uses exactly these).

Invariants: metrics live in prometheus_client's default registry (where vLLM registers its own `vllm:*`
metrics in-process), so `/metrics` shows both; label values are bounded (`BoundedLabels`); token counters
are incremented with the same numbers returned to clients in `usage`.
"""

from __future__ import annotations

import threading

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

OTHER = "other"
ANONYMOUS = "anonymous"

_LATENCY_BUCKETS = (
    0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)

HTTP_REQUESTS = Counter(
    "llmstack:http_requests",
    "HTTP requests on the API by endpoint, model and status",
    ["endpoint", "model", "status"],
)
API_KEY_REQUESTS = Counter("llmstack:api_key_requests", "Requests by API key id (non-secret)", ["api_key"])
TIME_TO_FIRST_TOKEN = Histogram(
    "llmstack:time_to_first_token_seconds",
    "Arrival to first token",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)
INTER_TOKEN_LATENCY = Histogram(
    "llmstack:inter_token_latency_seconds",
    "Time between tokens",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)
E2E_REQUEST_LATENCY = Histogram(
    "llmstack:e2e_request_latency_seconds", "Arrival to last token", ["model"], buckets=_LATENCY_BUCKETS
)
REQUEST_QUEUE_TIME = Histogram(
    "llmstack:request_queue_time_seconds", "Time waiting for admission", ["model"], buckets=_LATENCY_BUCKETS
)
REQUEST_PROMPT_TOKENS = Histogram(
    "llmstack:request_prompt_tokens", "Prompt tokens per request", ["model"], buckets=_TOKEN_BUCKETS
)
REQUEST_GENERATION_TOKENS = Histogram(
    "llmstack:request_generation_tokens", "Generated tokens per request", ["model"], buckets=_TOKEN_BUCKETS
)
PROMPT_TOKENS = Counter("llmstack:prompt_tokens", "Prompt tokens (sum of usage.prompt_tokens)", ["model"])
GENERATION_TOKENS = Counter(
    "llmstack:generation_tokens", "Generated tokens (sum of usage.completion_tokens)", ["model"]
)
NUM_REQUESTS_RUNNING = Gauge("llmstack:num_requests_running", "Requests admitted into the engine")
NUM_REQUESTS_WAITING = Gauge("llmstack:num_requests_waiting", "Requests queued for admission")
KV_CACHE_USAGE = Gauge(
    "llmstack:kv_cache_usage_perc",
    "KV cache usage (1 = full) at the last engine step; data parallel: the fullest rank",
)
# Per data-parallel engine rank (`engine` = vLLM's engine index, as in vLLM's own `vllm:*{engine=...}`),
# recorded by the engine's stat logger at every step of each rank.
ENGINE_KV_CACHE_USAGE = Gauge(
    "llmstack:engine_kv_cache_usage_perc", "KV cache usage (1 = full) of one engine rank", ["engine"]
)
ENGINE_REQUESTS_RUNNING = Gauge(
    "llmstack:engine_num_requests_running", "Requests the engine rank is running", ["engine"]
)
ENGINE_REQUESTS_WAITING = Gauge(
    "llmstack:engine_num_requests_waiting", "Requests waiting in the engine rank's scheduler", ["engine"]
)
ENGINE_REQUESTS_FINISHED = Counter(
    "llmstack:engine_requests_finished", "Requests the engine rank finished (any reason)", ["engine"]
)
ENGINE_RESTARTS = Counter(
    "llmstack:engine_restarts",
    "Engine replacements by cause: its core process died, or hung (no output while busy)",
    ["reason"],
)
for _reason in ("died", "hung"):  # both series exist from the start (0): a dashboard shows 0, not no data
    ENGINE_RESTARTS.labels(_reason)
LORA_ADAPTERS_LOADED = Gauge("llmstack:lora_adapters_loaded", "LoRA adapters known to the server")
IGNORED_REQUEST_FIELDS = Counter(
    "llmstack:ignored_request_fields",
    "Unknown request fields that were ignored (names bounded; more are `other`)",
    ["endpoint", "field"],
)


class BoundedLabels:
    """Maps values to label values: the first `limit` distinct values keep their name, later ones are `other`.
    Values in `always` never count against the limit."""

    def __init__(self, limit: int, always: tuple[str, ...] = ()) -> None:
        self._limit = limit
        self._always = set(always)
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        if value in self._always or value in self._seen:
            return value
        with self._lock:
            if len(self._seen) < self._limit:
                self._seen.add(value)
                return value
        return OTHER


def exposition() -> tuple[bytes, str]:
    """The classic text exposition of the default registry and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
