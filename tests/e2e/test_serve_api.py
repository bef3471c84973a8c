"""End to end: the OpenAI API of `serve` on the tiny model, through the official `openai` client.

One server for the module. Its first request is a one-token prompt (the AMX SIGILL guard: a fresh engine whose
first batch is tiny used to die on this CPU).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from core.chat import render_chat
from core.models import load_tokenizer
from tests.e2e.serve_helpers import metric, sse_events
from tests.support.server import RunningServer, start_server

BODY_LIMIT = 65536
MESSAGES: list[Any] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another one?"},
]


@pytest.fixture(scope="module")
def first_reply(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RunningServer, Any]]:
    log_dir = tmp_path_factory.mktemp("serve-api")
    with start_server(tiny_model_dir, "--max-request-body-bytes", str(BODY_LIMIT), log_dir=log_dir) as server:
        tokenizer = load_tokenizer(tiny_model_dir)
        one_token = tokenizer.convert_ids_to_tokens([tokenizer("a").input_ids[0]])[0]
        reply = httpx.post(
            f"{server.openai_url}/completions",
            json={"model": tiny_model_dir.name, "prompt": one_token, "max_tokens": 3, "temperature": 0},
            timeout=60,
        )
        yield server, reply


@pytest.fixture(scope="module")
def server(first_reply: tuple[RunningServer, Any]) -> RunningServer:
    return first_reply[0]


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.openai_url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> str:
    return tiny_model_dir.name


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    return load_tokenizer(tiny_model_dir)


def test_one_token_prompt_first_on_a_fresh_server(first_reply: tuple[RunningServer, Any]) -> None:
    server, reply = first_reply
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["usage"]["prompt_tokens"] == 1
    assert body["usage"]["completion_tokens"] == 3
    assert server.process.poll() is None


def test_chat_roles_and_exact_usage(client: openai.OpenAI, model: str, tokenizer: Any) -> None:
    reply = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=7, temperature=0)
    expected_prompt = len(tokenizer(render_chat(tokenizer, MESSAGES), add_special_tokens=False).input_ids)
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "length"
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == expected_prompt
    assert reply.usage.completion_tokens == 7
    assert reply.usage.total_tokens == expected_prompt + 7
    again = client.chat.completions.create(
        model=model, messages=MESSAGES, max_completion_tokens=7, temperature=0
    )
    assert again.choices[0].message.content == choice.message.content


def test_chat_stream_matches_non_stream_and_reports_usage(client: openai.OpenAI, model: str) -> None:
    plain = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=MESSAGES,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) >= 2, "streamed token by token, not in one piece"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None and plain.usage is not None
    assert last.usage.model_dump() == plain.usage.model_dump()


def test_raw_sse_frames_end_with_done(server: RunningServer, model: str) -> None:
    body = {"model": model, "messages": MESSAGES, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{server.openai_url}/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in e for e in events[:-1])


def test_completions_string_list_and_stream(client: openai.OpenAI, model: str, tokenizer: Any) -> None:
    prompts = ["The answer is", "Once upon a time there"]
    single = client.completions.create(model=model, prompt=prompts[0], max_tokens=6, temperature=0)
    assert single.object == "text_completion"
    assert single.usage is not None
    assert single.usage.prompt_tokens == len(tokenizer(prompts[0]).input_ids)
    assert single.usage.completion_tokens == 6
    both = client.completions.create(model=model, prompt=prompts, max_tokens=6, temperature=0)
    assert [c.index for c in both.choices] == [0, 1]
    assert both.choices[0].text == single.choices[0].text
    assert both.usage is not None
    assert both.usage.prompt_tokens == sum(len(tokenizer(p).input_ids) for p in prompts)
    assert both.usage.completion_tokens == 12
    stream = list(
        client.completions.create(
            model=model,
            prompt=prompts[0],
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == single.choices[0].text
    assert stream[-1].choices == [] and stream[-1].usage is not None
    assert stream[-1].usage.completion_tokens == 6


def test_n_returns_independent_choices(client: openai.OpenAI, model: str) -> None:
    reply = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=10, n=2, seed=7)
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.choices[0].message.content != reply.choices[1].message.content
    assert reply.usage is not None and reply.usage.completion_tokens == 20
    streamed = list(
        client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=5, n=2, stream=True)
    )
    roles = {c.choices[0].index for c in streamed if c.choices and c.choices[0].delta.role}
    finished = {c.choices[0].index for c in streamed if c.choices and c.choices[0].finish_reason}
    assert roles == finished == {0, 1}


def test_stop_string_cuts_the_output(client: openai.OpenAI, model: str) -> None:
    full = client.completions.create(model=model, prompt="The answer is", max_tokens=24, temperature=0)
    text = full.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), f"pick a visible stop string from {text!r}"
    cut = client.completions.create(
        model=model, prompt="The answer is", max_tokens=24, temperature=0, stop=[stop]
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[: text.index(stop)]


def test_seed_makes_sampling_reproducible(client: openai.OpenAI, model: str) -> None:
    def sample(seed: int) -> str | None:
        reply = client.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=16, temperature=1.0, top_p=0.95, seed=seed
        )
        return reply.choices[0].message.content

    assert sample(1234) == sample(1234)
    assert sample(1234) != sample(4321)


def test_chat_logprobs(client: openai.OpenAI, model: str) -> None:
    reply = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3
    )
    choice = reply.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    assert len(choice.logprobs.content) == 5
    for item in choice.logprobs.content:
        tops = [t.logprob for t in item.top_logprobs]
        assert len(tops) == 3
        assert tops == sorted(tops, reverse=True)
        assert item.logprob <= 0
        assert item.logprob == pytest.approx(tops[0], abs=1e-4), "greedy picks the most likely token"
    # a token that is only part of a UTF-8 character has no text of its own (the content shows U+FFFD)
    content = choice.message.content or ""
    assert "".join(i.token for i in choice.logprobs.content) == content.replace("\ufffd", "")


def test_completion_logprobs(client: openai.OpenAI, model: str) -> None:
    reply = client.completions.create(
        model=model, prompt="The answer is", max_tokens=4, temperature=0, logprobs=2
    )
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None
    assert (
        logprobs.tokens is not None
        and logprobs.token_logprobs is not None
        and logprobs.top_logprobs is not None
    )
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 4
    assert all(len(top) <= 2 for top in logprobs.top_logprobs)
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(4)]


def test_penalties_and_user_are_accepted(client: openai.OpenAI, model: str) -> None:
    base = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=30, temperature=0)
    penalised = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        max_tokens=30,
        temperature=0,
        presence_penalty=2.0,
        frequency_penalty=2.0,
        user="tester",
    )
    assert penalised.choices[0].message.content != base.choices[0].message.content


def test_models_lists_the_base_model(client: openai.OpenAI, model: str) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [model]
    assert models[0].model_dump()["parent"] is None


def _error(exc: openai.APIStatusError) -> dict[str, Any]:
    body = exc.response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    error: dict[str, Any] = body["error"]
    return error


def test_unknown_model_is_404_on_model(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert _error(info.value)["param"] == "model"
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="no-such-model", prompt="hi")
    assert _error(info.value)["param"] == "model"
    server_url = str(client.base_url).removesuffix("/v1/")
    assert metric(server_url, "llmstack:http_requests_total", model="no-such-model") == 0
    assert metric(server_url, "llmstack:http_requests_total", model="unknown", status="404") >= 2


def test_token_id_prompts(client: openai.OpenAI, model: str, tokenizer: Any) -> None:
    text = client.completions.create(model=model, prompt="The answer is", max_tokens=4, temperature=0)
    ids = tokenizer("The answer is").input_ids
    by_ids = client.completions.create(model=model, prompt=ids, max_tokens=4, temperature=0)
    assert by_ids.choices[0].text == text.choices[0].text
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model, prompt=[len(tokenizer) + 5], max_tokens=1)
    assert _error(info.value)["param"] == "prompt"


def test_prompt_longer_than_context_is_400(client: openai.OpenAI, model: str) -> None:
    long_prompt = "word " * 3000
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model, prompt=long_prompt, max_tokens=1)
    error = _error(info.value)
    assert error["code"] == "context_length_exceeded" and "context" in error["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=100000)
    assert _error(info.value)["param"] == "max_tokens"


def test_validation_errors_are_openai_shaped(
    client: openai.OpenAI, model: str, server: RunningServer
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model, messages=MESSAGES, temperature=5)
    assert _error(info.value)["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model, messages=[{"role": "robot", "content": "x"}])  # type: ignore[misc,list-item]
    assert _error(info.value)["param"].startswith("messages")
    bad_json = httpx.post(
        f"{server.openai_url}/chat/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert bad_json.status_code == 400
    assert bad_json.json()["error"]["type"] == "invalid_request_error"


def test_unknown_route_and_wrong_method(server: RunningServer) -> None:
    missing = httpx.get(f"{server.openai_url}/nothing-here")
    assert missing.status_code == 404
    assert set(missing.json()["error"]) == {"message", "type", "param", "code"}
    wrong = httpx.get(f"{server.openai_url}/chat/completions")
    assert wrong.status_code == 405
    assert set(wrong.json()["error"]) == {"message", "type", "param", "code"}


def test_body_too_large_is_413(server: RunningServer, model: str) -> None:
    huge = {"model": model, "prompt": "x" * (BODY_LIMIT + 10)}
    reply = httpx.post(f"{server.openai_url}/completions", json=huge, timeout=30)
    assert reply.status_code == 413
    assert reply.json()["error"]["code"] == "request_too_large"


def test_health_and_ready(server: RunningServer) -> None:
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/ready").status_code == 200


def test_token_counters_equal_returned_usage(
    client: openai.OpenAI, model: str, server: RunningServer
) -> None:
    before_prompt = metric(server.url, "llmstack:prompt_tokens_total", model=model)
    before_gen = metric(server.url, "llmstack:generation_tokens_total", model=model)
    a = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=5, n=2, seed=1)
    b = client.completions.create(model=model, prompt=["one", "two three"], max_tokens=3)
    assert a.usage is not None and b.usage is not None
    prompt = metric(server.url, "llmstack:prompt_tokens_total", model=model) - before_prompt
    gen = metric(server.url, "llmstack:generation_tokens_total", model=model) - before_gen
    assert prompt == a.usage.prompt_tokens + b.usage.prompt_tokens
    assert gen == a.usage.completion_tokens + b.usage.completion_tokens
    assert (
        metric(server.url, "llmstack:http_requests_total", endpoint="/v1/chat/completions", status="200") > 0
    )
    assert metric(server.url, "llmstack:api_key_requests_total", api_key="anonymous") > 0


def test_client_disconnect_aborts_the_engine_request(server: RunningServer, model: str) -> None:
    body = {
        "model": model,
        "prompt": "Tell me a long story",
        "max_tokens": 1000,
        "temperature": 0,
        "stream": True,
    }
    gen_before = metric(server.url, "vllm:generation_tokens_total")
    with httpx.stream("POST", f"{server.openai_url}/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        received = [next(lines) for _ in range(6)]
    assert any(line.startswith("data: ") for line in received)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if metric(server.url, "llmstack:num_requests_running") == 0:
            break
        time.sleep(0.1)
    assert metric(server.url, "llmstack:num_requests_running") == 0
    settled = metric(server.url, "vllm:generation_tokens_total")
    time.sleep(1.5)
    assert metric(server.url, "vllm:generation_tokens_total") == settled, "the engine kept generating"
    assert settled - gen_before < 1000
    assert metric(server.url, "vllm:num_requests_running") == 0
    # the server still works
    assert (
        httpx.post(
            f"{server.openai_url}/completions",
            json={"model": model, "prompt": "hi", "max_tokens": 2},
            timeout=30,
        ).status_code
        == 200
    )


def test_client_disconnect_aborts_a_non_streamed_request(server: RunningServer, model: str) -> None:
    body = {"model": model, "prompt": "Tell me a long story", "max_tokens": 1000, "temperature": 0}
    gen_before = metric(server.url, "vllm:generation_tokens_total")
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
        httpx.post(f"{server.openai_url}/completions", json=body, timeout=httpx.Timeout(60, read=0.5))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and metric(server.url, "vllm:num_requests_running") > 0:
        time.sleep(0.1)
    assert metric(server.url, "vllm:num_requests_running") == 0, "the engine request was aborted"
    settled = metric(server.url, "vllm:generation_tokens_total")
    time.sleep(1.5)
    assert metric(server.url, "vllm:generation_tokens_total") == settled, "the engine kept generating"
    assert settled - gen_before < 1000
    assert metric(server.url, "llmstack:http_requests_total", endpoint="/v1/completions", status="499") >= 1
