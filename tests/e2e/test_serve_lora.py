"""End to end: static multi-LoRA routing (`--lora-modules name=path ...`): listing, routing, metric labels."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.e2e.serve_helpers import metric
from tests.support.lora import build_lora_adapter
from tests.support.server import RunningServer, start_server


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    folder = tmp_path_factory.mktemp("serve-lora")
    first = build_lora_adapter(tiny_model_dir, folder / "first", seed=1)
    second = build_lora_adapter(tiny_model_dir, folder / "second", seed=2)
    args = [
        "--lora-modules",
        f"first={first}",
        f"second={second}",
        "--max-loras",
        "3",
        "--max-lora-rank",
        "8",
    ]
    with start_server(tiny_model_dir, *args, log_dir=folder) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.openai_url, api_key="unused", max_retries=0, timeout=60)


def _greedy(client: openai.OpenAI, model: str) -> str:
    reply = client.completions.create(model=model, prompt="The answer is", max_tokens=12, temperature=0)
    return reply.choices[0].text


def test_models_lists_adapters_with_parent(client: openai.OpenAI, tiny_model_dir: Path) -> None:
    rows = {m.id: m.model_dump() for m in client.models.list().data}
    assert set(rows) == {tiny_model_dir.name, "first", "second"}
    assert rows[tiny_model_dir.name]["parent"] is None
    assert rows["first"]["parent"] == rows["second"]["parent"] == tiny_model_dir.name


def test_requests_route_to_their_adapter(client: openai.OpenAI, tiny_model_dir: Path) -> None:
    base = _greedy(client, tiny_model_dir.name)
    first = _greedy(client, "first")
    second = _greedy(client, "second")
    assert len({base, first, second}) == 3, "each adapter changes the output"
    assert _greedy(client, "first") == first
    assert _greedy(client, tiny_model_dir.name) == base


def test_adapter_metrics_and_unknown_adapter(client: openai.OpenAI, server: RunningServer) -> None:
    client.chat.completions.create(model="second", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert metric(server.url, "llmstack:generation_tokens_total", model="second") >= 3
    assert metric(server.url, "llmstack:lora_adapters_loaded") == 2
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="third", prompt="hi", max_tokens=2)
    assert info.value.response.json()["error"]["param"] == "model"
