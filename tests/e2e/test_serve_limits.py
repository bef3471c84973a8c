"""End to end: API keys (digests, open health/ready/metrics, per-key metrics) and the admission queue."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.serve_helpers import metric
from tests.support.server import RunningServer, start_server

KEY_FLAG = "k3y-from-the-command-line-1"
KEY_FILE = "k3y-from-the-keys-file-2"


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    folder = tmp_path_factory.mktemp("serve-limits")
    keys = folder / "keys.txt"
    keys.write_text(f"# team keys\nalice:{KEY_FILE}\n")
    args = ["--api-key", KEY_FLAG, "--api-keys-file", str(keys)]
    args += ["--max-concurrent-requests", "1", "--max-queued-requests", "0", "--retry-after-seconds", "3"]
    with start_server(tiny_model_dir, *args, log_dir=folder) as running:
        yield running


def _chat(server: RunningServer, model: str, key: str | None, **extra: object) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra}
    return httpx.post(f"{server.openai_url}/chat/completions", json=body, headers=headers, timeout=60)


def test_missing_and_wrong_keys_are_401(server: RunningServer, tiny_model_dir: Path) -> None:
    for key in (None, "not-a-valid-key-at-all"):
        reply = _chat(server, tiny_model_dir.name, key)
        assert reply.status_code == 401
        assert reply.json()["error"]["type"] == "authentication_error"
    client = openai.OpenAI(base_url=server.openai_url, api_key="wrong-key-123456", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_both_keys_work_and_are_counted_by_id(server: RunningServer, tiny_model_dir: Path) -> None:
    assert _chat(server, tiny_model_dir.name, KEY_FLAG).status_code == 200
    client = openai.OpenAI(base_url=server.openai_url, api_key=KEY_FILE, max_retries=0)
    assert [m.id for m in client.models.list().data] == [tiny_model_dir.name]
    flag_id = hashlib.sha256(KEY_FLAG.encode()).hexdigest()[:8]
    assert metric(server.url, "llmstack:api_key_requests_total", api_key=flag_id) >= 1
    assert metric(server.url, "llmstack:api_key_requests_total", api_key="alice") >= 1
    exposition = httpx.get(f"{server.url}/metrics").text
    assert KEY_FLAG not in exposition and KEY_FILE not in exposition


def test_health_ready_metrics_need_no_key(server: RunningServer) -> None:
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(f"{server.url}{path}").status_code == 200


def test_full_queue_is_429_with_retry_after(server: RunningServer, tiny_model_dir: Path) -> None:
    model = tiny_model_dir.name
    body = {"model": model, "prompt": "Once", "max_tokens": 200, "temperature": 0, "stream": True}
    headers = {"Authorization": f"Bearer {KEY_FLAG}"}
    started = threading.Event()
    finished: list[str] = []

    def long_stream() -> None:
        with httpx.stream(
            "POST", f"{server.openai_url}/completions", json=body, headers=headers, timeout=120
        ) as response:
            for line in response.iter_lines():
                started.set()
                if line == "data: [DONE]":
                    finished.append(line)

    worker = threading.Thread(target=long_stream)
    worker.start()
    assert started.wait(30)
    try:
        busy = _chat(server, model, KEY_FLAG)
        assert busy.status_code == 429
        assert busy.headers["retry-after"] == "3"
        assert busy.json()["error"]["code"] == "queue_full"
        assert metric(server.url, "llmstack:num_requests_running") == 1
    finally:
        worker.join(120)
    assert finished == ["data: [DONE]"]
    assert _chat(server, model, KEY_FLAG).status_code == 200
