"""The engine's stat logger keeps each data-parallel rank apart: vLLM builds one logger per engine index and
calls it with that rank's stats; `/metrics` gets one series per rank and the server-wide KV gauge is the
fullest rank's."""

from __future__ import annotations

from types import SimpleNamespace

from prometheus_client import REGISTRY

from serve.engine.vllm_engine import _SchedulerStats


def _sample(name: str, engine: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"engine": engine})


def test_each_rank_reports_its_own_kv_usage_and_requests() -> None:
    stats = _SchedulerStats()
    assert stats.kv_cache_usage is None  # nothing reported yet
    rank7, rank8 = stats.factory(None, engine_index=7), stats.factory(None, engine_index=8)
    finished_before = _sample("llmstack:engine_requests_finished_total", "7") or 0.0

    rank7.record(
        SimpleNamespace(kv_cache_usage=0.25, num_running_reqs=3, num_waiting_reqs=1),
        SimpleNamespace(finished_requests=[object(), object()]),
    )
    rank8.record(SimpleNamespace(kv_cache_usage=0.5, num_running_reqs=0, num_waiting_reqs=0), None)

    assert _sample("llmstack:engine_kv_cache_usage_perc", "7") == 0.25
    assert _sample("llmstack:engine_kv_cache_usage_perc", "8") == 0.5
    assert _sample("llmstack:engine_num_requests_running", "7") == 3
    assert _sample("llmstack:engine_num_requests_waiting", "7") == 1
    assert _sample("llmstack:engine_requests_finished_total", "7") == finished_before + 2
    assert stats.kv_cache_usage == 0.5  # the fullest rank
    rank8.record(SimpleNamespace(kv_cache_usage=0.0, num_running_reqs=0, num_waiting_reqs=0), None)
    assert stats.kv_cache_usage == 0.25
