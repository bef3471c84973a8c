"""End to end: data parallel (`--data-parallel-size 2`, one core per engine rank) behind one `serve`.

Three starts (~6 min on 2 loaded cores, mostly start-up): a single-engine server (the reference: greedy
answers of the base model and of a LoRA adapter), the DP = 2 server, and a DP = 2 server whose rank 1 is a
second "node": `python -m serve.headless` in another process joining over loopback (that one is opt-in,
`--run-slow`, for CI time). On the DP server:
- 64 greedy requests at concurrency 8 all succeed and each equals the single-engine server's answer for its
  prompt (16 prompts, each sent 4 times, so every prompt is very likely answered by both ranks);
- vLLM's least-load balancer gives each rank at least 40% of them, read from vLLM's per-engine counter
  `vllm:request_success_total{engine=...}`; this server's per-rank counter says the same;
- an adapter loaded at run time through `POST /v1/adapters` (AsyncLLM's DP client sends it to every engine)
  answers, on both ranks (both per-engine counters move during its requests), what the single-engine
  server answers with the same adapter, and differently from the base model.
On the two-"node" server the same checks: 64 requests at concurrency 8, each rank >= 40%, the same
answers, this server's own per-rank counter `llmstack:engine_requests_finished_total` equal to vLLM's, and
an adapter loaded at run time answering like the single-engine server's on both ranks (the headless rank
reads the adapter from the same path: on real nodes that path must exist on every node).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.serve_helpers import scrape
from tests.support.lora import build_lora_adapter
from tests.support.server import REPO_ROOT, RunningServer, free_port, server_env, start_server

PROMPTS = [
    f"{word} number {i} is" for i, word in enumerate(["The answer", "Once upon a time", "a", "We"] * 4)
]
REQUESTS = PROMPTS * 4  # 64
CONCURRENCY = 8
MAX_TOKENS = 12
ENGINE_FLAGS = ("--dtype", "float32", "--enable-lora", "--max-loras", "2", "--max-lora-rank", "8")
SUCCESS = "vllm:request_success_total"
OURS = "llmstack:engine_requests_finished_total"


@pytest.fixture(scope="module")
def adapter(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_lora_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter") / "dp-lora", seed=7, rank=8)


def _complete(server: RunningServer, model: str) -> Callable[[str], str]:
    client = openai.OpenAI(base_url=server.openai_url, api_key="unused", max_retries=0, timeout=180)

    def one(prompt: str) -> str:
        reply = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
        return reply.choices[0].text

    return one


def _run(server: RunningServer, model: str, prompts: list[str]) -> list[str]:
    """Answers to `prompts` sent at CONCURRENCY, in order (an exception here is a failed request)."""
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        return list(pool.map(_complete(server, model), prompts))


def _per_engine(server: RunningServer, name: str) -> dict[str, float]:
    """{engine label: value} of `name` summed over its other labels."""
    totals: dict[str, float] = {}
    for sample, labels, value in scrape(server.url):
        if sample == name and "engine" in labels:
            totals[labels["engine"]] = totals.get(labels["engine"], 0.0) + value
    return totals


@pytest.fixture(scope="module")
def reference(
    tiny_model_dir: Path, adapter: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, list[str]]:
    """The single-engine server's greedy answers: base model and adapter, for every prompt."""
    with start_server(
        tiny_model_dir,
        *ENGINE_FLAGS,
        "--lora-modules",
        f"dp-lora={adapter}",
        log_dir=tmp_path_factory.mktemp("dp1"),
    ) as single:
        return {
            "base": _run(single, tiny_model_dir.name, PROMPTS),
            "lora": _run(single, "dp-lora", PROMPTS[:1]),
        }


@pytest.fixture(scope="module")
def dp_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    with start_server(
        tiny_model_dir,
        *ENGINE_FLAGS,
        "--data-parallel-size",
        "2",
        env=env,
        log_dir=tmp_path_factory.mktemp("dp2"),
        startup_timeout=400,
    ) as running:
        yield running


def test_two_ranks_share_the_load_and_answer_like_one_engine(
    dp_server: RunningServer, reference: dict[str, list[str]], tiny_model_dir: Path
) -> None:
    before = _per_engine(dp_server, SUCCESS)
    answers = _run(dp_server, tiny_model_dir.name, REQUESTS)
    after = _per_engine(dp_server, SUCCESS)

    assert sorted(after) == ["0", "1"], after  # vLLM's metrics name both engine ranks
    done = {rank: after[rank] - before.get(rank, 0.0) for rank in after}
    assert sum(done.values()) == len(REQUESTS), done
    assert min(done.values()) >= 0.4 * len(REQUESTS), done
    expected = reference["base"] * 4
    mismatches = [i for i, (got, want) in enumerate(zip(answers, expected, strict=True)) if got != want]
    assert not mismatches, [(REQUESTS[i], answers[i], expected[i]) for i in mismatches]
    assert "EngineCore_DP1" in dp_server.log()
    assert _per_engine(dp_server, OURS) == after  # this server's per-rank counter agrees with vLLM's


def test_adapter_loaded_at_run_time_answers_the_same_on_both_ranks(
    dp_server: RunningServer, reference: dict[str, list[str]], adapter: Path
) -> None:
    loaded = httpx.post(
        f"{dp_server.url}/v1/adapters", json={"name": "dp-lora", "path": str(adapter)}, timeout=120
    )
    assert loaded.status_code == 200, loaded.text
    before = _per_engine(dp_server, SUCCESS)
    answers = _run(dp_server, "dp-lora", PROMPTS[:1] * 16)
    after = _per_engine(dp_server, SUCCESS)

    assert all(after[rank] > before.get(rank, 0.0) for rank in ("0", "1")), (before, after)
    assert set(answers) == {reference["lora"][0]}, set(answers)
    assert reference["lora"][0] != reference["base"][0]  # the adapter changes the answer


@contextmanager
def _headless_node(tiny_model_dir: Path, args: list[str], cpu: str, log_path: Path) -> Iterator[None]:
    """A second "node": `python -m serve.headless` with `args`, on core `cpu`, stopped on exit."""
    command = [sys.executable, "-m", "serve.headless", "--model", str(tiny_model_dir), *ENGINE_FLAGS, *args]
    with log_path.open("w") as log:
        worker = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env={**server_env(), "VLLM_CPU_OMP_THREADS_BIND": cpu},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            yield
        finally:
            worker.terminate()
            try:
                worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()


API_NODE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_CPU_OMP_THREADS_BIND": "0"}


@pytest.mark.slow  # two more engine starts (~3 min on 2 cores): opt-in with --run-slow
def test_a_headless_second_node_joins_as_rank_1(
    tiny_model_dir: Path, reference: dict[str, list[str]], adapter: Path, tmp_path: Path
) -> None:
    layout = ["--data-parallel-size", "2", "--data-parallel-size-local", "1"]
    layout += ["--data-parallel-address", "127.0.0.1", "--data-parallel-rpc-port", str(free_port())]
    node_log = tmp_path / "headless.log"
    with (
        _headless_node(tiny_model_dir, [*layout, "--data-parallel-start-rank", "1"], "1", node_log),
        start_server(
            tiny_model_dir, *ENGINE_FLAGS, *layout, env=API_NODE_ENV, log_dir=tmp_path, startup_timeout=400
        ) as api,
    ):
        answers = _run(api, tiny_model_dir.name, REQUESTS)
        done = _per_engine(api, SUCCESS)
        assert sorted(done) == ["0", "1"] and sum(done.values()) == len(REQUESTS), done
        assert min(done.values()) >= 0.4 * len(REQUESTS), done
        assert answers == reference["base"] * 4
        assert _per_engine(api, OURS) == done

        loaded = httpx.post(
            f"{api.url}/v1/adapters", json={"name": "dp-lora", "path": str(adapter)}, timeout=120
        )
        assert loaded.status_code == 200, loaded.text
        lora_answers = _run(api, "dp-lora", PROMPTS[:1] * 16)
        after = _per_engine(api, SUCCESS)
        assert all(after[rank] > done[rank] for rank in ("0", "1")), (done, after)
        assert set(lora_answers) == {reference["lora"][0]}, set(lora_answers)
    assert "EngineCore_DP1" in node_log.read_text()


@pytest.mark.slow  # one more engine start: opt-in with --run-slow
def test_pipeline_parallel_2_on_one_node_answers_like_one_engine(
    tiny_model_dir: Path, reference: dict[str, list[str]], tmp_path: Path
) -> None:
    """PP = 2, one core per stage, eager (serve's CPU default): the plugin's `pp_cpu` fix makes it run."""
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    with start_server(
        tiny_model_dir, *ENGINE_FLAGS, "--pipeline-parallel-size", "2", env=env, log_dir=tmp_path
    ) as pp:
        assert _run(pp, tiny_model_dir.name, PROMPTS) == reference["base"]
        assert "Worker_PP1" in pp.log()


@pytest.mark.slow  # two more engine starts: opt-in with --run-slow
def test_pipeline_parallel_across_two_nodes_answers_like_one_engine(
    tiny_model_dir: Path, reference: dict[str, list[str]], tmp_path: Path
) -> None:
    """PP = 2 with `--nnodes 2`: `serve` runs stage 0, `serve.headless --node-rank 1` stage 1 (loopback)."""
    layout = ["--pipeline-parallel-size", "2", "--nnodes", "2", "--master-addr", "127.0.0.1"]
    layout += ["--master-port", str(free_port())]
    with (
        _headless_node(tiny_model_dir, [*layout, "--node-rank", "1"], "1", tmp_path / "node1.log"),
        start_server(
            tiny_model_dir, *ENGINE_FLAGS, *layout, "--node-rank", "0", env=API_NODE_ENV, log_dir=tmp_path
        ) as pp,
    ):
        assert _run(pp, tiny_model_dir.name, PROMPTS) == reference["base"]
