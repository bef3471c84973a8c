"""End to end: request parity with vLLM's own server, through the official `openai` client and httpx.

Sampling extensions, every chat role and content form, prompt scoring (echo + logprobs + max_tokens 0, as
lm-evaluation-harness sends it), `stream_options.continuous_usage_stats`, /tokenize, /detokenize, /version,
vLLM's LoRA load/unload routes, defaults from `generation_config.json`, and the field policy. One server for
the module, on a copy of the tiny model whose generation_config.json sets `temperature: 0` and
`max_new_tokens: 12` (so a request that leaves them unset shows where its defaults came from).
"""

from __future__ import annotations

import json
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from core.models import load_tokenizer
from tests.e2e.serve_helpers import metric
from tests.support.lora import build_lora_adapter
from tests.support.server import RunningServer, start_server

ADMIN_KEY = "admin-" + secrets.token_urlsafe(24)
MODEL = "tiny-parity"
DEFAULT_MAX_TOKENS = 12
CHAT: list[Any] = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with sampling defaults in its generation config (no artifact.json: its digests would
    no longer match)."""
    folder = tmp_path_factory.mktemp("parity-model") / "model"
    shutil.copytree(tiny_model_dir, folder, ignore=shutil.ignore_patterns("artifact.json"))
    config = json.loads((folder / "generation_config.json").read_text())
    config.update({"temperature": 0.0, "max_new_tokens": DEFAULT_MAX_TOKENS})
    (folder / "generation_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    args = [
        "--served-model-name",
        MODEL,
        "--enable-lora",
        "--max-lora-rank",
        "8",
        "--admin-api-key",
        ADMIN_KEY,
    ]
    with start_server(model_dir, *args, log_dir=tmp_path_factory.mktemp("serve-parity")) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.openai_url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> Any:
    return load_tokenizer(model_dir)


def _chat(client: openai.OpenAI, **kwargs: Any) -> Any:
    return client.chat.completions.create(model=MODEL, messages=kwargs.pop("messages", CHAT), **kwargs)


# --- defaults from generation_config.json ------------------------------------------------------------


def test_unset_fields_take_the_models_generation_config(client: openai.OpenAI) -> None:
    first, second = _chat(client), _chat(client)
    assert first.usage.completion_tokens == DEFAULT_MAX_TOKENS, "max_new_tokens from generation_config"
    assert first.choices[0].message.content == second.choices[0].message.content, "temperature 0 from it"
    greedy = _chat(client, temperature=0, max_tokens=DEFAULT_MAX_TOKENS)
    assert greedy.choices[0].message.content == first.choices[0].message.content
    sampled = {
        _chat(client, temperature=1.5, seed=s, max_tokens=8).choices[0].message.content for s in range(3)
    }
    assert len(sampled) > 1, "an explicit temperature wins over the model's default"


# --- sampling extensions -----------------------------------------------------------------------------


def test_top_k_and_min_p_one_are_greedy(client: openai.OpenAI) -> None:
    greedy = _chat(client, temperature=0, max_tokens=10).choices[0].message.content
    assert (
        _chat(client, temperature=1.5, seed=3, max_tokens=10, extra_body={"top_k": 1})
        .choices[0]
        .message.content
        == greedy
    )
    assert (
        _chat(client, temperature=1.5, seed=4, max_tokens=10, extra_body={"min_p": 1.0})
        .choices[0]
        .message.content
        == greedy
    )


def test_logit_bias_allowed_and_bad_tokens(client: openai.OpenAI, tokenizer: Any) -> None:
    token = tokenizer("colour").input_ids[0]
    forced = _chat(client, max_tokens=4, logit_bias={str(token): 100})
    assert forced.choices[0].message.content == tokenizer.decode([token] * 4)
    allowed = tokenizer(" red green blue").input_ids
    reply = _chat(client, max_tokens=6, extra_body={"allowed_token_ids": allowed}, logprobs=True)
    texts = {tokenizer.decode([t]) for t in allowed}
    assert {item.token for item in reply.choices[0].logprobs.content} <= texts
    greedy = _chat(client, max_tokens=16, logprobs=True)
    words = [i.token.strip() for i in greedy.choices[0].logprobs.content if i.token.strip().isalpha()]
    assert words, "the greedy answer has a plain word to ban"
    banned = _chat(client, max_tokens=16, extra_body={"bad_words": [words[0]]}).choices[0].message.content
    assert words[0] in (greedy.choices[0].message.content or "") and words[0] not in banned


def test_stop_token_ids_min_tokens_and_stop_strings(client: openai.OpenAI, tokenizer: Any) -> None:
    token = tokenizer("colour").input_ids[0]
    always = {"logit_bias": {str(token): 100}}
    stopped = client.completions.create(
        model=MODEL, prompt="The module", max_tokens=10, extra_body={**always, "stop_token_ids": [token]}
    )
    assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens == 1
    held = {**always, "stop_token_ids": [token], "min_tokens": 3}
    later = client.completions.create(model=MODEL, prompt="The module", max_tokens=10, extra_body=held)
    assert later.choices[0].finish_reason == "stop"
    assert later.usage.completion_tokens == 4, "min_tokens holds the stop token back for 3 tokens"
    greedy = client.completions.create(model=MODEL, prompt="The module", max_tokens=10, logprobs=0)
    tokens = greedy.choices[0].logprobs.tokens
    stop = next(t for t in tokens[2:] if t.strip())
    kept = client.completions.create(
        model=MODEL,
        prompt="The module",
        max_tokens=10,
        stop=[stop],
        extra_body={"include_stop_str_in_output": True},
    )
    cut = client.completions.create(model=MODEL, prompt="The module", max_tokens=10, stop=[stop])
    assert cut.choices[0].finish_reason == kept.choices[0].finish_reason == "stop"
    assert kept.choices[0].text == cut.choices[0].text + stop


def test_repetition_penalty_and_special_token_options(client: openai.OpenAI) -> None:
    base = _chat(client, max_tokens=24).choices[0].message.content
    penalised = (
        _chat(client, max_tokens=24, extra_body={"repetition_penalty": 1.8}).choices[0].message.content
    )
    assert penalised != base
    extra = {"ignore_eos": True, "skip_special_tokens": False, "spaces_between_special_tokens": False}
    assert _chat(client, max_tokens=6, extra_body=extra).usage.completion_tokens == 6


def test_top_logprobs_up_to_vllms_limit(client: openai.OpenAI) -> None:
    reply = _chat(client, max_tokens=2, logprobs=True, top_logprobs=20)
    assert len(reply.choices[0].logprobs.content[0].top_logprobs) == 20
    with pytest.raises(openai.BadRequestError) as info:
        _chat(client, max_tokens=2, logprobs=True, top_logprobs=21)
    assert info.value.response.json()["error"]["param"] == "top_logprobs"


# --- messages ------------------------------------------------------------------------------------------


def test_every_role_and_content_form(client: openai.OpenAI, server: RunningServer) -> None:
    messages: list[Any] = [
        {"role": "developer", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Paris?"}],
            "name": "ann",
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny.", "refusal": None, "annotations": []},
        {"role": "user", "content": "Thanks."},
    ]
    reply = _chat(client, messages=messages, max_tokens=3)
    assert reply.choices[0].finish_reason == "length"
    tokenized = httpx.post(f"{server.url}/tokenize", json={"model": MODEL, "messages": messages}).json()
    assert tokenized["count"] == reply.usage.prompt_tokens, "/tokenize renders like the chat endpoint"
    as_string = [
        {**m, "content": "Weather in Paris?"} if m["role"] == "user" and isinstance(m["content"], list) else m
        for m in messages
    ]
    assert _chat(client, messages=as_string, max_tokens=3).usage.prompt_tokens == reply.usage.prompt_tokens


def test_image_and_audio_parts_are_refused_by_name(server: RunningServer) -> None:
    for part in (
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}},
        {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}},
    ):
        body = {"model": MODEL, "messages": [{"role": "user", "content": [part]}]}
        reply = httpx.post(f"{server.openai_url}/chat/completions", json=body)
        assert reply.status_code == 400
        error = reply.json()["error"]
        assert error["param"] == "messages.0.content" and part["type"] in error["message"]


def test_template_options_and_chat_echo(client: openai.OpenAI, server: RunningServer) -> None:
    partial: list[Any] = [*CHAT, {"role": "assistant", "content": "My favourite colour is"}]
    cont = _chat(
        client,
        messages=partial,
        max_tokens=4,
        extra_body={"continue_final_message": True, "add_generation_prompt": False, "echo": True},
    )
    assert cont.choices[0].message.content.startswith("My favourite colour is")
    open_prompt = httpx.post(
        f"{server.url}/tokenize",
        json={"messages": partial, "continue_final_message": True, "add_generation_prompt": False},
    ).json()
    closed_prompt = httpx.post(
        f"{server.url}/tokenize", json={"messages": partial, "add_generation_prompt": False}
    ).json()
    assert cont.usage.prompt_tokens == open_prompt["count"] < closed_prompt["count"], (
        "the final message stays open"
    )
    kwargs = _chat(client, max_tokens=2, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert kwargs.usage.completion_tokens == 2


# --- completions: echo, prompt scoring, prompt logprobs ----------------------------------------------


def test_prompt_scoring_as_lm_eval_sends_it(client: openai.OpenAI, tokenizer: Any) -> None:
    prompt = "The module is loaded when"
    reply = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=1, temperature=0
    )
    choice = reply.choices[0]
    assert choice.text == prompt
    lp = choice.logprobs
    ids = tokenizer(prompt).input_ids
    assert len(lp.tokens) == len(lp.token_logprobs) == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    assert "".join(lp.tokens) == prompt and lp.text_offset[-1] == len(prompt) - len(lp.tokens[-1])
    assert reply.usage.completion_tokens == 0 and reply.usage.prompt_tokens == len(ids)
    generated = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, echo=True, logprobs=1)
    assert generated.choices[0].text.startswith(prompt)
    scored = generated.choices[0].logprobs.token_logprobs
    assert len(scored) == len(ids) + 3 and scored[0] is None
    assert scored[1 : len(ids)] == pytest.approx(lp.token_logprobs[1:], abs=1e-4), "same prompt scores"


def test_prompt_logprobs_field(server: RunningServer) -> None:
    body = {"model": MODEL, "prompt": "The module", "max_tokens": 1, "prompt_logprobs": 2}
    choice = httpx.post(f"{server.openai_url}/completions", json=body).json()["choices"][0]
    positions = choice["prompt_logprobs"]
    assert positions[0] is None and len(positions) >= 2
    assert all(isinstance(v["logprob"], float) for v in positions[1].values())


def test_unimplemented_openai_fields_are_400_by_name(server: RunningServer) -> None:
    for field, value in (("suffix", "x"), ("best_of", 2)):
        reply = httpx.post(
            f"{server.openai_url}/completions", json={"model": MODEL, "prompt": "x", field: value}
        )
        assert reply.status_code == 400 and reply.json()["error"]["param"] == field, reply.text
    for field, value in (("use_beam_search", True), ("functions", [])):
        body = {"model": MODEL, "messages": CHAT, field: value}
        reply = httpx.post(f"{server.openai_url}/chat/completions", json=body)
        assert reply.status_code == 400 and reply.json()["error"]["param"] == field, reply.text


def test_unknown_fields_are_ignored_logged_and_counted(server: RunningServer) -> None:
    before = metric(server.url, "llmstack:ignored_request_fields_total", field="x_sdk_trace")
    for _ in range(2):
        body = {"model": MODEL, "messages": CHAT, "max_tokens": 2, "x_sdk_trace": "abc"}
        assert httpx.post(f"{server.openai_url}/chat/completions", json=body).status_code == 200
    assert metric(server.url, "llmstack:ignored_request_fields_total", field="x_sdk_trace") == before + 2
    assert server.log().count("ignoring unknown request field 'x_sdk_trace'") == 1, "logged once per name"


# --- streaming usage ------------------------------------------------------------------------------------


def test_continuous_usage_stats(client: openai.OpenAI) -> None:
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt="The module",
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True},  # type: ignore[typeddict-unknown-key]
        )
    )
    counts = [c.usage.completion_tokens for c in chunks]
    assert counts == sorted(counts) and counts[-1] == 5
    assert all(c.usage.prompt_tokens == chunks[-1].usage.prompt_tokens for c in chunks)


# --- tokenize, detokenize, version ---------------------------------------------------------------------


def test_tokenize_detokenize_and_version(server: RunningServer, tokenizer: Any) -> None:
    reply = httpx.post(
        f"{server.url}/tokenize", json={"model": MODEL, "prompt": "hello world", "return_token_strs": True}
    ).json()
    assert reply["tokens"] == tokenizer("hello world").input_ids
    assert reply["count"] == len(reply["tokens"]) and reply["max_model_len"] == 1024
    assert reply["token_strs"] == tokenizer.convert_ids_to_tokens(reply["tokens"])
    back = httpx.post(f"{server.url}/detokenize", json={"model": MODEL, "tokens": reply["tokens"]}).json()
    assert back["prompt"] == tokenizer.decode(reply["tokens"])
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": [10**9]}).status_code == 400
    assert httpx.post(f"{server.url}/tokenize", json={"model": "nope", "prompt": "x"}).status_code == 404
    version = httpx.get(f"{server.url}/version").json()
    assert version["version"].count(".") >= 2 and "llmstack" in version


# --- vLLM's LoRA management routes ---------------------------------------------------------------------


def test_vllm_shaped_lora_routes(
    server: RunningServer, model_dir: Path, tmp_path: Path, client: openai.OpenAI
) -> None:
    adapter = build_lora_adapter(model_dir, tmp_path / "adapter", seed=5)
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    body = {"lora_name": "vllm-style", "lora_path": str(adapter)}
    assert httpx.post(f"{server.openai_url}/load_lora_adapter", json=body).status_code == 401, "admin role"
    loaded = httpx.post(f"{server.openai_url}/load_lora_adapter", json=body, headers=admin, timeout=60)
    assert loaded.status_code == 200 and "vllm-style" in loaded.text
    assert "vllm-style" in [m.id for m in client.models.list().data]
    assert (
        client.completions.create(model="vllm-style", prompt="hi", max_tokens=2).usage.completion_tokens == 2
    )
    again = httpx.post(f"{server.openai_url}/load_lora_adapter", json=body, headers=admin, timeout=60)
    assert again.status_code == 409
    gone = httpx.post(
        f"{server.openai_url}/unload_lora_adapter", json={"lora_name": "vllm-style"}, headers=admin
    )
    assert gone.status_code == 200
    assert "vllm-style" not in [m.id for m in client.models.list().data]
    missing = httpx.post(
        f"{server.openai_url}/unload_lora_adapter", json={"lora_name": "vllm-style"}, headers=admin
    )
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "adapter_not_found"
