"""The HTTP layer on a small deterministic fake engine: paths a real engine cannot be made to take on demand
(an engine failure after the 200 was sent) and body-limit details. Every feature is also tested end to end."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from core.models import load_tokenizer
from serve.app import build_app
from serve.engine.protocol import ChoiceDelta, EngineOutput
from serve.settings import parse_settings


class FakeEngine:
    """Emits the token "x" `length` times per request; raises after `fail_after` outputs when set."""

    def __init__(self, tokenizer: Any, fail_after: int | None = None) -> None:
        self._tokenizer = tokenizer
        self.fail_after = fail_after
        self.aborted: list[str] = []

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def max_model_len(self) -> int:
        return 64

    @property
    def default_sampling(self) -> dict[str, Any]:
        return {}

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: Any, lora: Any = None
    ) -> AsyncGenerator[EngineOutput, None]:
        length = params.max_tokens
        for step in range(length):
            if self.fail_after is not None and step == self.fail_after:
                raise RuntimeError("engine exploded")
            last = step == length - 1
            delta = ChoiceDelta(0, "x", (7,), None, "length" if last else None)
            yield EngineOutput(len(prompt_token_ids), (delta,), last)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def add_lora(self, lora: Any) -> bool:
        return True

    async def remove_lora(self, lora_id: int) -> bool:
        return True

    async def check_health(self) -> None:
        return None

    def kv_cache_usage(self) -> float | None:
        return 0.25

    def shutdown(self) -> None:
        return None


@pytest.fixture
def engine(tiny_model_dir: Path) -> FakeEngine:
    return FakeEngine(load_tokenizer(tiny_model_dir))


@pytest.fixture
def client(engine: FakeEngine) -> Iterator[TestClient]:
    settings = parse_settings(
        ["--model", "/models/fake", "--served-model-name", "fake", "--max-request-body-bytes", "2048"]
    )
    with TestClient(build_app(settings, engine), raise_server_exceptions=False) as test_client:
        yield test_client


CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


def test_non_stream_usage_counts_tokens(client: TestClient) -> None:
    body = client.post("/v1/chat/completions", json=CHAT).json()
    assert body["choices"][0]["message"]["content"] == "xxxxx"
    assert body["usage"]["completion_tokens"] == 5


def test_error_after_the_200_is_an_error_frame_then_done(client: TestClient, engine: FakeEngine) -> None:
    engine.fail_after = 2
    reply = client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert reply.status_code == 200
    frames = [line[6:] for line in reply.text.splitlines() if line.startswith("data: ")]
    assert frames[-1] == "[DONE]"
    error = json.loads(frames[-2])
    assert set(error) == {"error"} and error["error"]["type"] == "internal_error"
    contents = [json.loads(f)["choices"][0]["delta"].get("content") for f in frames[:-2]]
    assert contents == ["", "x", "x"]
    assert len(engine.aborted) == 1, "the failed request is aborted in the engine"


def test_engine_failure_without_stream_is_a_500(client: TestClient, engine: FakeEngine) -> None:
    engine.fail_after = 0
    reply = client.post("/v1/completions", json={"model": "fake", "prompt": "hi"})
    assert reply.status_code == 500
    assert set(reply.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("stop", ["", ["ok", ""]])
@pytest.mark.parametrize("endpoint", ["/v1/chat/completions", "/v1/completions"])
def test_empty_stop_string_is_a_400(client: TestClient, endpoint: str, stop: str | list[str]) -> None:
    body = {**CHAT, "stop": stop} if "chat" in endpoint else {"model": "fake", "prompt": "hi", "stop": stop}
    reply = client.post(endpoint, json=body)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["type"] == "invalid_request_error"


def test_sampling_parameters_vllm_refuses_are_a_400() -> None:
    from serve.errors import OpenAIError
    from serve.openai.protocol import make_sampling_params

    with pytest.raises(OpenAIError) as refused:
        make_sampling_params(max_tokens=4, stop=[""])  # what the wire models refuse, should it get through
    assert refused.value.status == 400 and "sampling parameters" in str(refused.value.body())


def test_chunked_body_over_the_limit_is_413(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "fake", "prompt": "'
        for _ in range(10):
            yield b"y" * 512
        yield b'"}'

    reply = client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert reply.status_code == 413
    assert reply.json()["error"]["code"] == "request_too_large"


def test_metrics_expose_kv_cache_usage(client: TestClient) -> None:
    text = client.get("/metrics").text
    assert "llmstack:kv_cache_usage_perc 0.25" in text
    assert "llmstack:num_requests_running 0.0" in text


def test_response_format_and_structured_outputs_together_are_a_400(client: TestClient) -> None:
    body = {
        **CHAT,
        "response_format": {"type": "json_object"},
        "structured_outputs": {"choice": ["a", "b"]},
    }
    reply = client.post("/v1/chat/completions", json=body)
    assert reply.status_code == 400 and "not both" in reply.json()["error"]["message"]
    text_format = {**body, "response_format": {"type": "text"}}  # no constraint of its own: allowed
    assert client.post("/v1/chat/completions", json=text_format).status_code == 200
