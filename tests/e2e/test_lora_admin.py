"""The adapter management API behind keys, and bounded per-adapter metric labels, on the real engine.

With API keys set, only an `--admin-api-key` may load, list or unload adapters; ordinary keys use them.
`--metrics-max-model-labels 1`: the first adapter used keeps its name as a label, the next is `other`.
`--adapter-unload-timeout-seconds 0`: an unload cancels the adapter's in-flight requests at once.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.serve_helpers import metric
from tests.support.lora import build_lora_adapter
from tests.support.server import RunningServer, start_server

USER_KEY = "user-" + secrets.token_urlsafe(24)
ADMIN_KEY = "admin-" + secrets.token_urlsafe(24)


@pytest.fixture(scope="module")
def adapter_paths(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("lora-admin")
    return {
        name: str(build_lora_adapter(tiny_model_dir, root / name, seed=seed))
        for name, seed in [("x", 1), ("y", 2)]
    }


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    args = ["--served-model-name", "tiny", "--enable-lora", "--max-lora-rank", "8", "--max-model-len", "256"]
    args += ["--api-key", USER_KEY, "--admin-api-key", ADMIN_KEY, "--metrics-max-model-labels", "1"]
    args += ["--adapter-unload-timeout-seconds", "0"]
    with start_server(tiny_model_dir, *args, log_dir=tmp_path_factory.mktemp("serve-admin")) as running:
        yield running


def call(server: RunningServer, method: str, path: str, key: str | None, **kwargs: object) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, server.url + path, headers=headers, timeout=60, **kwargs)  # type: ignore[arg-type]


def test_only_the_admin_key_manages_adapters(server: RunningServer, adapter_paths: dict[str, str]) -> None:
    body = {"name": "x", "path": adapter_paths["x"]}
    assert call(server, "GET", "/v1/adapters", None).status_code == 401
    refused = call(server, "POST", "/v1/adapters", USER_KEY, json=body)
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "insufficient_permissions"
    assert call(server, "POST", "/v1/adapters", "wrong-" + USER_KEY, json=body).status_code == 403
    loaded = call(server, "POST", "/v1/adapters", ADMIN_KEY, json=body)
    assert loaded.status_code == 200, loaded.text
    assert [a["name"] for a in call(server, "GET", "/v1/adapters", ADMIN_KEY).json()["data"]] == ["x"]

    user = openai.OpenAI(base_url=server.openai_url, api_key=USER_KEY, max_retries=0)
    assert [m.id for m in user.models.list().data] == ["tiny", "x"]
    assert user.completions.create(model="x", prompt="hello", max_tokens=4, temperature=0).choices[0].text
    assert call(server, "DELETE", "/v1/adapters/x", USER_KEY).status_code == 403
    assert call(server, "DELETE", "/v1/adapters/x", ADMIN_KEY).status_code == 200
    assert [m.id for m in user.models.list().data] == ["tiny"]


def test_adapter_metric_labels_are_bounded(server: RunningServer, adapter_paths: dict[str, str]) -> None:
    user = openai.OpenAI(base_url=server.openai_url, api_key=USER_KEY, max_retries=0)
    for name in ("x", "y"):
        assert (
            call(
                server, "POST", "/v1/adapters", ADMIN_KEY, json={"name": name, "path": adapter_paths[name]}
            ).status_code
            == 200
        )
        user.completions.create(model=name, prompt="hello", max_tokens=4, temperature=0)
    text = httpx.get(server.url + "/metrics", timeout=10).text
    labels = set(re.findall(r'^llmstack:generation_tokens_total\{model="([^"]+)"\}', text, re.MULTILINE))
    assert labels == {"x", "other"}


def test_unload_cancels_the_requests_that_outlive_the_timeout(
    server: RunningServer, adapter_paths: dict[str, str]
) -> None:
    """(Last in this module: the adapter it adds is labelled `other` in the metrics.) A stream still running
    when the unload's timeout (0 s here) ends is cut short, its engine request aborted, and the unload answers
    at once instead of waiting for it."""
    body = {"name": "long", "path": adapter_paths["y"]}
    assert call(server, "POST", "/v1/adapters", ADMIN_KEY, json=body).status_code == 200
    user = openai.OpenAI(base_url=server.openai_url, api_key=USER_KEY, max_retries=0, timeout=60)
    max_tokens = 240  # --max-model-len 256
    stream = user.completions.create(
        model="long",
        prompt="hello",
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    events = iter(stream)
    text = next(events).choices[0].text
    unloaded = call(server, "DELETE", "/v1/adapters/long", ADMIN_KEY)
    assert unloaded.status_code == 200, unloaded.text
    finish_reason = None
    with pytest.raises((openai.APIError, httpx.HTTPError)):  # the connection ends without [DONE]
        for event in events:
            text += event.choices[0].text
            finish_reason = event.choices[0].finish_reason or finish_reason
    assert finish_reason is None
    with pytest.raises(openai.NotFoundError):
        user.completions.create(model="long", prompt="hello", max_tokens=2)
    assert metric(server.url, "llmstack:num_requests_running") == 0
