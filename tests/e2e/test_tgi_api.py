"""End to end: TGI's generate API through huggingface_hub's `InferenceClient` (pinned in the lock), on the
real engine, plus the design documents' `TGIClient` wrapper used as it is written.

huggingface_hub 2.x renamed `text_generation`'s `stop_sequences` keyword to `stop`, and no release that still
has the old name installs beside transformers 5; so `TGIClient` below passes `stop=` and nothing else is
changed. huggingface_hub refuses every URL while HF_HUB_OFFLINE is set: the tests lift it for the client.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from huggingface_hub import InferenceClient
from huggingface_hub.errors import ValidationError as HubValidationError

from tests.e2e.serve_helpers import metric
from tests.support.lora import build_lora_adapter
from tests.support.server import RunningServer, start_server

MODEL = "tiny-tgi"
PROMPT = "The module is loaded when"


class TGIClient:
    """The TGI client of the design documents: a thin wrapper around huggingface_hub's InferenceClient."""

    def __init__(self, endpoint: str) -> None:
        self.client = InferenceClient(endpoint)

    def generate(
        self,
        prompt: str,
        max_new_tokens: int = 256,
        temperature: float = 0.7,
        top_p: float = 0.95,
        stop_sequences: list[str] | None = None,
    ) -> str:
        return self.client.text_generation(
            prompt,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            stop=stop_sequences,  # huggingface_hub 2.x: was `stop_sequences=`
            return_full_text=False,
        )

    def stream_generate(self, prompt: str, max_new_tokens: int = 256, **kwargs: Any) -> Iterator[str]:
        yield from self.client.text_generation(prompt, max_new_tokens=max_new_tokens, stream=True, **kwargs)


@pytest.fixture(autouse=True)
def _hub_online(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


@pytest.fixture(scope="module")
def adapter(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_lora_adapter(tiny_model_dir, tmp_path_factory.mktemp("tgi-lora") / "a", seed=3)


@pytest.fixture(scope="module")
def server(
    tiny_model_dir: Path, adapter: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    args = ["--served-model-name", MODEL, "--lora-modules", f"sql={adapter}", "--max-lora-rank", "8"]
    with start_server(tiny_model_dir, *args, log_dir=tmp_path_factory.mktemp("serve-tgi")) as running:
        yield running


@pytest.fixture(scope="module")
def hub(server: RunningServer) -> InferenceClient:
    return InferenceClient(server.url)


def test_text_generation_plain_and_streamed(hub: InferenceClient, server: RunningServer) -> None:
    text = hub.text_generation(PROMPT, max_new_tokens=12)
    assert text == hub.text_generation(PROMPT, max_new_tokens=12), "no sampling parameter: greedy"
    tokens = list(hub.text_generation(PROMPT, max_new_tokens=12, stream=True))
    assert len(tokens) == 12 and "".join(tokens).replace("\ufffd", "") == text.replace("\ufffd", "")
    native = httpx.post(
        f"{server.url}/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 12}}
    )
    assert native.json()["generated_text"] == text


def test_details_prefill_and_top_tokens(hub: InferenceClient) -> None:
    out = hub.text_generation(
        PROMPT, max_new_tokens=6, details=True, decoder_input_details=True, top_n_tokens=3
    )
    details = out.details
    assert details.finish_reason == "length" and details.generated_tokens == 6 and len(details.tokens) == 6
    assert all(t.logprob <= 0 and isinstance(t.id, int) and t.special is False for t in details.tokens)
    assert len(details.prefill) >= 2 and details.prefill[0].logprob is None
    assert all(len(top) == 3 for top in details.top_tokens)
    assert all(top[0]["logprob"] >= top[-1]["logprob"] for top in details.top_tokens)  # parsed as dicts
    streamed = list(hub.text_generation(PROMPT, max_new_tokens=6, details=True, stream=True))
    assert [s.token.id for s in streamed] == [t.id for t in details.tokens]
    assert streamed[-1].generated_text == out.generated_text and streamed[-1].details.generated_tokens == 6
    assert all(s.generated_text is None for s in streamed[:-1])


def test_stop_sequences_return_full_text_and_seed(hub: InferenceClient) -> None:
    full = hub.text_generation(PROMPT, max_new_tokens=16, details=True)
    pieces = [t.text for t in full.details.tokens]
    stop = next(p for p in pieces[3:] if p.strip())
    cut = hub.text_generation(PROMPT, max_new_tokens=16, stop=[stop], details=True)
    assert cut.details.finish_reason == "stop_sequence"
    assert stop not in cut.generated_text and full.generated_text.startswith(cut.generated_text)
    assert hub.text_generation(PROMPT, max_new_tokens=4, return_full_text=True).startswith(PROMPT)
    sampled = [
        hub.text_generation(PROMPT, max_new_tokens=8, do_sample=True, seed=s, details=True) for s in (1, 1, 2)
    ]
    assert sampled[0].generated_text == sampled[1].generated_text != sampled[2].generated_text
    assert sampled[0].details.seed == 1


def test_grammar_json_and_regex(hub: InferenceClient) -> None:
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 10},
            "days": {"type": "integer", "minimum": 1, "maximum": 9},
        },
        "required": ["city", "days"],
    }
    for seed in range(3):
        text = hub.text_generation(
            PROMPT, max_new_tokens=60, do_sample=True, seed=seed, grammar={"type": "json", "value": schema}
        )
        jsonschema.validate(json.loads(text), schema)
    code = hub.text_generation(
        PROMPT, max_new_tokens=10, grammar={"type": "regex", "value": "[A-Z]{3}-[0-9]{2}"}
    )
    assert re.fullmatch("[A-Z]{3}-[0-9]{2}", code)


def test_adapter_id_routes_to_the_lora_registry(hub: InferenceClient, server: RunningServer) -> None:
    base = hub.text_generation(PROMPT, max_new_tokens=10)
    tuned = hub.text_generation(PROMPT, max_new_tokens=10, adapter_id="sql")
    assert tuned != base
    client = openai.OpenAI(base_url=server.openai_url, api_key="unused", max_retries=0)
    same = client.completions.create(model="sql", prompt=PROMPT, max_tokens=10, temperature=0)
    assert same.choices[0].text == tuned, "one registry behind both APIs"
    unknown = httpx.post(
        f"{server.url}/generate", json={"inputs": PROMPT, "parameters": {"adapter_id": "nope"}}
    )
    assert unknown.status_code == 422 and unknown.json()["error_type"] == "validation"


def test_refusals_are_tgi_shaped(hub: InferenceClient, server: RunningServer) -> None:
    with pytest.raises(HubValidationError, match="watermark"):
        hub.text_generation(PROMPT, max_new_tokens=4, watermark=True)
    too_many_stops = {"stop": [f"s{i}" for i in range(17)]}  # /info says max_stop_sequences 16
    for parameters in (
        {"typical_p": 0.5},
        {"best_of": 2},
        {"max_new_tokens": 0},
        {"bogus": 1},
        too_many_stops,
    ):
        reply = httpx.post(f"{server.url}/generate", json={"inputs": PROMPT, "parameters": parameters})
        assert reply.status_code == 422, (parameters, reply.text)
        assert set(reply.json()) == {"error", "error_type"}
    too_long = httpx.post(f"{server.url}/generate", json={"inputs": "word " * 3000})
    assert too_long.status_code == 422


def test_info_and_metrics(server: RunningServer) -> None:
    info = httpx.get(f"{server.url}/info").json()
    assert info["model_id"] == MODEL and info["max_total_tokens"] == 1024 and info["max_stop_sequences"] == 16
    before = metric(server.url, "llmstack:generation_tokens_total", model=MODEL)
    requests = metric(server.url, "llmstack:http_requests_total", endpoint="/generate", status="200")
    body = httpx.post(
        f"{server.url}/generate",
        json={"inputs": PROMPT, "parameters": {"max_new_tokens": 5, "details": True}},
    ).json()
    assert body["details"]["generated_tokens"] == 5
    assert metric(server.url, "llmstack:generation_tokens_total", model=MODEL) == before + 5
    assert (
        metric(server.url, "llmstack:http_requests_total", endpoint="/generate", status="200") == requests + 1
    )


def test_design_documents_tgi_client(server: RunningServer) -> None:
    client = TGIClient(server.url)
    text = client.generate(PROMPT, max_new_tokens=12, temperature=0.7, top_p=0.95)
    assert isinstance(text, str) and text
    tokens = list(client.stream_generate(PROMPT, max_new_tokens=12))
    assert len(tokens) == 12
    stopped = client.generate(PROMPT, max_new_tokens=24, stop_sequences=[" the", "\n"])
    assert " the" not in stopped and "\n" not in stopped
