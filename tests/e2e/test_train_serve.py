"""End to end: an adapter made by `train lora` is served by `serve` (real vLLM engine) with no conversion,
changes the answer, and answers as the same adapter does under transformers + PEFT; loaded at start
(`--lora-modules`) and through the adapter API at run time alike (the one train → serve test)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch

from core.artifact import verify_artifact
from core.chat import render_chat
from core.models import load_causal_lm, load_tokenizer
from tests.support.server import RunningServer, start_server
from tests.unit.train.conftest import chat_records, write_jsonl
from train.config import LoraRecipe
from train.lora import train_lora

QUESTION = [
    {"role": "system", "content": "You answer about Python keywords."},
    {"role": "user", "content": "Tell me about lambda."},
]
MAX_TOKENS = 10
RECIPE = {
    "lora": {"rank": 8, "alpha": 16, "dropout": 0.0},
    "data": {"max_length": 128, "heldout_every": 5},
    "loop": {
        "max_steps": 40,
        "batch_size": 4,
        "eval_every": 20,
        "checkpoint_every": 0,
        "progress": False,
        "optim": {"lr": 5e-3, "warmup_steps": 2},
    },
}


@pytest.fixture(scope="module")
def adapter(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("train-serve")
    data = write_jsonl(folder / "chat.jsonl", chat_records(40))
    result = train_lora(tiny_model_dir, data, folder / "adapter", LoraRecipe.model_validate(RECIPE))
    assert result.eval_loss_initial is not None and result.eval_loss < result.eval_loss_initial
    verify_artifact(folder / "adapter")
    return folder / "adapter"


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, adapter: Path) -> Iterator[RunningServer]:
    args = ["--lora-modules", f"trained={adapter}", "--max-loras", "2", "--max-lora-rank", "8"]
    with start_server(tiny_model_dir, *args, log_dir=adapter.parent) as running:
        yield running


def _peft_greedy(base_dir: Path, adapter: Path | None) -> str:
    from peft import PeftModel

    tokenizer = load_tokenizer(base_dir)
    model = load_causal_lm(base_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).eval()
    ids = tokenizer(render_chat(tokenizer, QUESTION), add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=MAX_TOKENS, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.openai_url, api_key="unused", max_retries=0, timeout=60)


def _ask(client: openai.OpenAI, model: str) -> str:
    reply = client.chat.completions.create(
        model=model,
        messages=QUESTION,  # type: ignore[arg-type]
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    return reply.choices[0].message.content or ""


def test_trained_adapter_is_served_and_changes_the_answer(
    client: openai.OpenAI, tiny_model_dir: Path, adapter: Path
) -> None:
    base, tuned = _ask(client, tiny_model_dir.name), _ask(client, "trained")
    assert tuned != base
    assert tuned == _peft_greedy(tiny_model_dir, adapter)  # vLLM applies the adapter as PEFT does
    assert base == _peft_greedy(tiny_model_dir, None)


def test_trained_adapter_loads_at_run_time_as_it_is(
    server: RunningServer, client: openai.OpenAI, tiny_model_dir: Path, adapter: Path
) -> None:
    """The same artifact (PEFT files + artifact.json with the base's digest), loaded through
    `POST /v1/adapters`, answers as the one loaded at start."""
    loaded = httpx.post(
        f"{server.url}/v1/adapters", json={"name": "trained-at-run-time", "path": str(adapter)}, timeout=120
    )
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["parent"] == tiny_model_dir.name
    assert _ask(client, "trained-at-run-time") == _ask(client, "trained")
    assert httpx.delete(f"{server.url}/v1/adapters/trained-at-run-time", timeout=120).status_code == 200
