"""End to end: vLLM's own options on `serve` have their effect, each checked by what a client can see.

One server for the module, started with a `vllm serve`-style command line (positional model) that sets:
`--served-model-name` with two names, `--max-logprobs`, `--enable-prefix-caching` with
`--enable-prompt-tokens-details`, `--chat-template`, `--generation-config vllm` with
`--override-generation-config`, n-gram `--speculative-config`, `--kv-cache-dtype fp8` and `--max-num-seqs 1`.
The model's own generation_config.json asks for 12 new tokens, so a default of 3 shows that vLLM's
`--generation-config vllm` ignored it and the override applied.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from core.models import load_tokenizer
from tests.e2e.serve_helpers import metric, scrape
from tests.support.server import RunningServer, start_server

NAMES = ("tiny-main", "tiny-alias")
TEMPLATE = "{% for m in messages %}<<{{ m['role'] }}>>{{ m['content'] }}{% endfor %}<<assistant>>"
OVERRIDE_MAX_TOKENS = 3


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("options-model") / "model"
    shutil.copytree(tiny_model_dir, folder, ignore=shutil.ignore_patterns("artifact.json"))
    config = json.loads((folder / "generation_config.json").read_text())
    config.update({"max_new_tokens": 12})
    (folder / "generation_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    folder = tmp_path_factory.mktemp("serve-options")
    template = folder / "template.jinja"
    template.write_text(TEMPLATE)
    speculative = {
        "method": "ngram",
        "num_speculative_tokens": 3,
        "prompt_lookup_max": 3,
        "prompt_lookup_min": 2,
    }
    args = [
        "--served-model-name", *NAMES,
        "--max-logprobs", "2",
        "--enable-prefix-caching",
        "--enable-prompt-tokens-details",
        "--chat-template", str(template),
        "--generation-config", "vllm",
        "--override-generation-config", json.dumps({"max_new_tokens": OVERRIDE_MAX_TOKENS}),
        "--speculative-config", json.dumps(speculative),
        "--kv-cache-dtype", "fp8",
        "--max-num-seqs", "1",
    ]  # fmt: skip
    # start_server passes `--model`; the positional form is covered by the unit tests of the parser
    with start_server(model_dir, *args, log_dir=folder) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.openai_url, api_key="unused", max_retries=0)


def test_every_served_name_is_listed_and_answers(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data][:2] == list(NAMES)
    for name in NAMES:
        reply = client.completions.create(model=name, prompt="hello", max_tokens=2)
        assert reply.choices[0].text is not None
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="tiny-nope", prompt="hello", max_tokens=2)


def test_more_logprobs_than_max_logprobs_is_a_400(client: openai.OpenAI) -> None:
    ok = client.completions.create(model=NAMES[0], prompt="hello", max_tokens=2, logprobs=2)
    assert ok.choices[0].logprobs is not None
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.completions.create(model=NAMES[0], prompt="hello", max_tokens=2, logprobs=3)


def test_a_repeated_long_prompt_reports_cached_tokens(client: openai.OpenAI) -> None:
    system = "alpha beta gamma delta " * 60  # several KV-cache blocks
    messages: Any = [{"role": "system", "content": system}, {"role": "user", "content": "hi"}]
    first = client.chat.completions.create(model=NAMES[0], messages=messages, max_tokens=2)
    again = client.chat.completions.create(model=NAMES[0], messages=messages, max_tokens=2)
    assert first.usage is not None and again.usage is not None
    assert first.usage.prompt_tokens_details is not None and again.usage.prompt_tokens_details is not None
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = again.usage.prompt_tokens_details.cached_tokens or 0
    assert again.usage.prompt_tokens // 2 < cached <= again.usage.prompt_tokens


def test_the_chat_template_option_renders_the_prompt(server: RunningServer, model_dir: Path) -> None:
    reply = httpx.post(
        f"{server.url}/tokenize",
        json={"model": NAMES[0], "messages": [{"role": "user", "content": "hi there"}]},
        timeout=30,
    )
    assert reply.status_code == 200, reply.text
    expected = load_tokenizer(model_dir)("<<user>>hi there<<assistant>>", add_special_tokens=False).input_ids
    assert reply.json()["tokens"] == expected


def test_generation_config_override_sets_the_default_max_tokens(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=NAMES[0], messages=[{"role": "user", "content": "count"}], extra_body={"ignore_eos": True}
    )
    assert reply.usage is not None and reply.usage.completion_tokens == OVERRIDE_MAX_TOKENS
    assert reply.choices[0].finish_reason == "length"


def test_ngram_speculative_decoding_drafts_and_accepts(server: RunningServer, client: openai.OpenAI) -> None:
    prompt = "one two three four " * 8
    client.completions.create(
        model=NAMES[0], prompt=prompt, max_tokens=24, temperature=0, extra_body={"ignore_eos": True}
    )
    assert metric(server.url, "vllm:spec_decode_num_draft_tokens_total") > 0
    assert metric(server.url, "vllm:spec_decode_num_drafts_total") > 0


def test_kv_cache_dtype_reaches_the_engine(server: RunningServer) -> None:
    infos = [labels for name, labels, _ in scrape(server.url) if name == "vllm:cache_config_info"]
    assert infos and infos[0]["cache_dtype"] == "fp8"


def test_max_num_seqs_one_runs_one_request_at_a_time(server: RunningServer, client: openai.OpenAI) -> None:
    def one() -> None:
        client.completions.create(
            model=NAMES[0], prompt="go", max_tokens=48, temperature=1.0, extra_body={"ignore_eos": True}
        )

    threads = [threading.Thread(target=one) for _ in range(3)]
    for thread in threads:
        thread.start()
    running: list[float] = []
    waiting: list[float] = []
    while any(t.is_alive() for t in threads):
        samples = scrape(server.url)
        running.append(metric(server.url, "llmstack:engine_num_requests_running", samples=samples))
        waiting.append(metric(server.url, "llmstack:engine_num_requests_waiting", samples=samples))
        time.sleep(0.05)
    for thread in threads:
        thread.join()
    assert max(running) == 1 and max(waiting) >= 1, (running, waiting)
