"""Multi-LoRA serving end to end: `serve` on the real vLLM engine, driven with the official `openai` client.

One server for the module, started with adapters from all three sources (`--lora-modules`, `--lora-dir`,
`--lora-registry`), four adapters for `--max-loras 2` (so vLLM's LRU must swap them), float32 so that the
served adapters can be compared token for token with the adapters merged into the base by PEFT. Checked:
listing, routing, per-adapter metrics, concurrent mixed traffic, corrupt adapters (truncated weights, a
digest mismatch, another base model, a rank above the limit) refused at runtime while traffic goes on,
and runtime load and unload under traffic.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest

from core.artifact import ManifestDraft, write_artifact
from tests.e2e.serve_helpers import metric
from tests.support.corrupt import flip_bit, truncate_half
from tests.support.lora import build_lora_adapter, merge_lora
from tests.support.server import RunningServer, start_server

BASE = "tiny"
PROMPTS = ["The quick brown fox", "def main():\n    return"]
MAX_TOKENS = 12
STARTUP_ADAPTERS = ["a1", "a2", "a3", "a4"]


@dataclass
class Adapters:
    root: Path
    paths: dict[str, Path] = field(default_factory=dict)


@pytest.fixture(scope="module")
def adapters(
    tiny_model_dir: Path, tiny_model_dir_b: Path, tmp_path_factory: pytest.TempPathFactory
) -> Adapters:
    root = tmp_path_factory.mktemp("lora-e2e")
    made = Adapters(root)
    places = {
        "a1": root / "a1",
        "a2": root / "dir" / "a2",
        "a3": root / "a3",
        "a4": root / "a4",
        "a5": root / "a5",
    }
    for seed, (name, path) in enumerate(places.items(), 1):
        made.paths[name] = build_lora_adapter(tiny_model_dir, path, seed=seed)
    (root / "registry.yaml").write_text("adapters:\n  - {name: a3, path: a3}\n  - {name: a4, path: a4}\n")
    truncated = shutil.copytree(made.paths["a1"], root / "truncated")
    truncate_half(truncated / "adapter_model.safetensors")
    made.paths["truncated"] = truncated
    made.paths["tampered"] = _tampered(made.paths["a1"], root / "tampered")
    made.paths["wrong-base"] = build_lora_adapter(tiny_model_dir_b, root / "wrong-base", seed=1)
    made.paths["rank16"] = build_lora_adapter(tiny_model_dir, root / "rank16", seed=9, rank=16)
    return made


def _tampered(good: Path, dest: Path) -> Path:
    """The adapter wrapped as an artifact (`artifact.json` with file digests), then one weight bit flipped."""

    def populate(tmp: Path) -> ManifestDraft:
        shutil.copytree(good, tmp, dirs_exist_ok=True)
        return ManifestDraft(kind="lora", parameters={"made_by": "test_lora_serving"})

    write_artifact(dest, populate)
    flip_bit(dest / "adapter_model.safetensors")
    return dest


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, adapters: Adapters) -> Iterator[RunningServer]:
    args = ["--served-model-name", BASE, "--dtype", "float32", "--max-model-len", "512"]
    args += ["--max-loras", "2", "--max-lora-rank", "8", "--lora-modules", f"a1={adapters.paths['a1']}"]
    args += [
        "--lora-dir",
        str(adapters.root / "dir"),
        "--lora-registry",
        str(adapters.root / "registry.yaml"),
    ]
    with start_server(tiny_model_dir, *args, log_dir=adapters.root / "logs") as running:
        yield running


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.openai_url, api_key="unused", max_retries=0, timeout=120)


def complete(
    client: openai.OpenAI, model: str, prompt: str, max_tokens: int = MAX_TOKENS, *, stream: bool = False
) -> str:
    """The greedy completion's text (streamed: its chunks joined)."""
    if stream:
        events = client.completions.create(
            model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True
        )
        return "".join(event.choices[0].text for event in events)
    result = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
    return result.choices[0].text


@pytest.fixture(scope="module")
def alone(client: openai.OpenAI) -> dict[tuple[str, str], str]:
    """Each (model, prompt) greedy output, sent one request at a time."""
    return {(m, p): complete(client, m, p) for m in [BASE, *STARTUP_ADAPTERS] for p in PROMPTS}


class Traffic:
    """Background requests cycling over `models`, each checked against its output when sent alone (with
    `stream`, the second worker's requests are streamed)."""

    def __init__(
        self,
        client: openai.OpenAI,
        expected: dict[tuple[str, str], str],
        models: list[str],
        *,
        stream: bool = False,
    ) -> None:
        self.client, self.expected, self.models, self.stream = client, expected, models, stream
        self.stop = threading.Event()
        self.done = 0
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(2)]

    def _run(self, offset: int) -> None:
        i = offset
        while not self.stop.is_set():
            model, prompt = self.models[i % len(self.models)], PROMPTS[i % len(PROMPTS)]
            try:
                text = complete(self.client, model, prompt, stream=self.stream and offset == 1)
                if text != self.expected[(model, prompt)]:
                    self.failures.append(f"{model}: {text!r} != {self.expected[(model, prompt)]!r}")
                self.done += 1
            except Exception as err:
                self.failures.append(f"{model}: {type(err).__name__}: {err}")
            i += 1

    def __enter__(self) -> Traffic:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(120)


def admin(server: RunningServer, method: str, path: str, **kwargs: object) -> httpx.Response:
    return httpx.request(method, f"{server.url}{path}", timeout=120, **kwargs)  # type: ignore[arg-type]


def test_models_and_adapters_are_listed(
    server: RunningServer, client: openai.OpenAI, adapters: Adapters
) -> None:
    models = {m.id: m.model_extra for m in client.models.list().data}
    assert list(models) == [BASE, *STARTUP_ADAPTERS]
    assert models[BASE]["parent"] is None  # type: ignore[index]
    assert all(models[a]["parent"] == BASE for a in STARTUP_ADAPTERS)  # type: ignore[index]
    listed = admin(server, "GET", "/v1/adapters").json()["data"]
    assert [(a["name"], a["path"], a["rank"], a["parent"]) for a in listed] == [
        (name, str(adapters.paths[name]), 8, BASE) for name in STARTUP_ADAPTERS
    ]
    assert len({a["lora_id"] for a in listed}) == 4
    assert all(a["loaded_at"] and a["in_flight"] == 0 for a in listed)


def test_base_and_adapters_give_different_outputs(alone: dict[tuple[str, str], str]) -> None:
    for prompt in PROMPTS:
        outputs = [alone[(m, prompt)] for m in [BASE, *STARTUP_ADAPTERS]]
        assert len(set(outputs)) == len(outputs), outputs


@pytest.mark.parametrize("name", ["a1", "a2"])
def test_adapter_equals_the_adapter_merged_into_the_base(
    name: str, alone: dict[tuple[str, str], str], adapters: Adapters, tiny_model_dir: Path, tmp_path: Path
) -> None:
    import torch

    from core.models import load_causal_lm, load_tokenizer

    merged_dir = merge_lora(tiny_model_dir, adapters.paths[name], tmp_path / "merged")
    model = load_causal_lm(merged_dir, dtype=torch.float32)
    tokenizer = load_tokenizer(merged_dir)
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer(prompt).input_ids])
        out = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False)
        reference = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        assert alone[(name, prompt)] == reference


def test_concurrent_mixed_traffic_equals_each_request_alone(
    client: openai.OpenAI, alone: dict[tuple[str, str], str]
) -> None:
    jobs = [(m, p) for _ in range(2) for m in [BASE, *STARTUP_ADAPTERS] for p in PROMPTS]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: complete(client, *job), jobs))
    mismatches = [(job, got) for job, got in zip(jobs, results, strict=True) if got != alone[job]]
    assert not mismatches


def test_adapter_requests_are_counted_under_their_name(server: RunningServer, client: openai.OpenAI) -> None:
    before = metric(server.url, "llmstack:generation_tokens_total", model="a2")
    reply = client.chat.completions.create(
        model="a2",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        extra_body={"ignore_eos": True},
    )
    assert reply.usage is not None and reply.usage.completion_tokens == 3
    assert metric(server.url, "llmstack:generation_tokens_total", model="a2") >= before + 3
    assert metric(server.url, "llmstack:lora_adapters_loaded") == len(STARTUP_ADAPTERS)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        pytest.param("truncated", "unreadable", id="truncated-weights"),
        pytest.param("tampered", "is corrupt: file adapter_model.safetensors", id="digest-mismatch"),
        pytest.param("wrong-base", "different model from the served tiny", id="wrong-base"),
        pytest.param("rank16", "rank 16, above the server's --max-lora-rank 8", id="rank-above-limit"),
    ],
)
def test_corrupt_adapter_is_refused_while_serving_goes_on(
    server: RunningServer,
    client: openai.OpenAI,
    alone: dict[tuple[str, str], str],
    adapters: Adapters,
    name: str,
    message: str,
) -> None:
    """Offered while requests to the base and to adapters run (one worker streaming), a corrupt adapter is
    an OpenAI 400 naming its folder and its problem; every request still answers as when sent alone, the
    listing is unchanged, and a sound adapter then loads under the refused name and answers."""
    path = adapters.paths[name]
    with Traffic(client, alone, [BASE, "a1", "a3"], stream=True) as traffic:
        time.sleep(0.3)
        response = admin(server, "POST", "/v1/adapters", json={"name": name, "path": str(path)})
        time.sleep(0.3)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"} and error["type"]
    assert message in error["message"] and str(path) in error["message"]
    assert (error["param"], error["code"]) == ("path", "invalid_adapter")
    assert traffic.done > 0
    assert not traffic.failures
    assert [m.id for m in client.models.list().data] == [BASE, *STARTUP_ADAPTERS]
    sound = admin(server, "POST", "/v1/adapters", json={"name": name, "path": str(adapters.paths["a5"])})
    try:
        assert sound.status_code == 200, sound.text
        answer = client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=4, temperature=0)
        assert answer.usage is not None and answer.usage.completion_tokens >= 1
    finally:  # leave the module's server with its startup adapters only
        admin(server, "DELETE", f"/v1/adapters/{name}")


def test_runtime_load_and_unload_under_concurrent_requests(
    server: RunningServer, client: openai.OpenAI, alone: dict[tuple[str, str], str], adapters: Adapters
) -> None:
    with Traffic(client, alone, [BASE, "a1", "a2"]) as traffic:
        loaded = admin(server, "POST", "/v1/adapters", json={"name": "a5", "path": str(adapters.paths["a5"])})
        assert loaded.status_code == 200, loaded.text
        assert loaded.json()["parent"] == BASE
        assert "a5" in [m.id for m in client.models.list().data]
        a5_alone = complete(client, "a5", PROMPTS[0])
        assert a5_alone not in {alone[(m, PROMPTS[0])] for m in [BASE, *STARTUP_ADAPTERS]}

        # Three long streams on a5; unload it once each has started.
        started = threading.Barrier(4)
        chunk_times: list[list[float]] = [[], [], []]
        texts = ["", "", ""]
        finish: list[str | None] = [None, None, None]

        def stream(i: int) -> None:
            events = client.completions.create(
                model="a5", prompt=PROMPTS[0], max_tokens=64, temperature=0, stream=True
            )
            for n, event in enumerate(events):
                if n == 0:
                    started.wait(60)
                chunk_times[i].append(time.monotonic())
                texts[i] += event.choices[0].text
                finish[i] = event.choices[0].finish_reason or finish[i]

        workers = [threading.Thread(target=stream, args=(i,)) for i in range(3)]
        for w in workers:
            w.start()
        started.wait(60)
        delete_sent = time.monotonic()
        unloaded = admin(server, "DELETE", "/v1/adapters/a5")
        for w in workers:
            w.join(120)
    assert unloaded.status_code == 200, unloaded.text
    assert unloaded.json()["requests"] >= 4
    assert any(times[-1] > delete_sent for times in chunk_times)  # the unload came while they ran
    assert finish == ["length", "length", "length"]
    assert all(text.startswith(a5_alone) for text in texts)
    with pytest.raises(openai.NotFoundError):
        complete(client, "a5", PROMPTS[0])
    assert traffic.done > 0
    assert not traffic.failures
    assert admin(server, "DELETE", "/v1/adapters/a5").status_code == 404


def test_unknown_model_is_a_404_on_param_model(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        complete(client, "no-such-adapter", PROMPTS[0])
    assert err.value.body["param"] == "model"  # type: ignore[index]
