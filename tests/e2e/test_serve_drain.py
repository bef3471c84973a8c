"""End to end: SIGTERM drains: /ready and new requests get 503, the stream in flight finishes, exit 0."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.support.server import start_server


def test_sigterm_drains_then_exits_zero(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = tiny_model_dir.name
    with start_server(tiny_model_dir, "--drain-timeout-seconds", "60", log_dir=tmp_path) as server:
        body = {"model": model, "prompt": "Once", "max_tokens": 200, "temperature": 0, "stream": True}
        first_chunk = threading.Event()
        events: list[str] = []

        def stream() -> None:
            with httpx.stream("POST", f"{server.openai_url}/completions", json=body, timeout=120) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        first_chunk.set()

        worker = threading.Thread(target=stream)
        worker.start()
        assert first_chunk.wait(30)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert worker.is_alive(), "the stream should still be running while draining"
        ready = httpx.get(f"{server.url}/ready")
        assert ready.status_code == 503
        refused = httpx.post(
            f"{server.openai_url}/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
        )
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "draining"
        assert httpx.get(f"{server.url}/health").status_code == 200
        worker.join(120)
        assert events[-1] == "[DONE]"
        finishes = [json.loads(e)["choices"][0]["finish_reason"] for e in events[:-1]]
        assert finishes[-1] == "length"
        assert server.process.wait(60) == 0
    assert "draining" in server.log()


@pytest.mark.slow  # a second server start (~15-70 s on 2 shared cores)
def test_drain_timeout_bounds_the_wait(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = tiny_model_dir.name
    with start_server(tiny_model_dir, "--drain-timeout-seconds", "1", log_dir=tmp_path) as server:
        body = {"model": model, "prompt": "Once", "max_tokens": 1000, "temperature": 0, "stream": True}
        first_chunk = threading.Event()

        def stream() -> None:
            try:
                with httpx.stream(
                    "POST", f"{server.openai_url}/completions", json=body, timeout=120
                ) as response:
                    for _ in response.iter_lines():
                        first_chunk.set()
                        time.sleep(0.05)  # a slow reader: the stream cannot finish within the drain timeout
            except httpx.HTTPError:
                pass

        worker = threading.Thread(target=stream, daemon=True)
        worker.start()
        assert first_chunk.wait(30)
        start = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        code = server.process.wait(60)
        assert time.monotonic() - start < 30
        assert code == 0
        assert "drain timeout" in server.log()
