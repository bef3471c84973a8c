"""End to end: a real lm-evaluation-harness run (`local-completions`, lm-eval pinned in the lock) against the
server matches the same harness run on its `hf` backend (transformers, the same weights).

The harness's stock tasks load their data from the hub, which cannot be reached here, so the task is a
custom YAML over a local JSONL file made from the built-in corpus (held-out paragraphs): a multiple-choice
task whose loglikelihood requests are exactly what lm-eval sends (token-id prompts, `echo`, `logprobs: 1`).
Both runs are float32. Tolerance: every loglikelihood within 2e-3 absolute (measured differences are ~1e-5),
and the same accuracy.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from core.textdata import builtin_texts
from tests.support.server import RunningServer, start_server

MODEL = "tiny-eval"
TASK = "llmstack_pydoc_choice"
DOCS = 12


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A task YAML and its JSONL: the start of a paragraph, then its true next words among three others."""
    folder = tmp_path_factory.mktemp("lm-eval-task")
    words = [p.split() for p in builtin_texts("heldout") if len(p.split()) >= 20][: DOCS + 3]
    rng = random.Random(0)
    with (folder / "docs.jsonl").open("w") as out:
        for i, paragraph in enumerate(words[:DOCS]):
            others = [w for j, w in enumerate(words) if j != i]
            choices = [" " + " ".join(paragraph[10:14])]
            choices += [" " + " ".join(rng.choice(others)[10:14]) for _ in range(3)]
            out.write(
                json.dumps({"context": " ".join(paragraph[:10]), "choices": choices, "label": 0}) + "\n"
            )
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'docs.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    return folder


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    args = ["--served-model-name", MODEL, "--dtype", "float32"]
    with start_server(tiny_model_dir, *args, log_dir=tmp_path_factory.mktemp("serve-lm-eval")) as running:
        yield running


def _run(model: str, model_args: str, task_dir: Path) -> dict[str, Any]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(  # type: ignore[no-any-return]
        model=model,
        model_args=model_args,
        tasks=[TASK],
        task_manager=TaskManager(include_path=str(task_dir)),
        log_samples=True,
        batch_size=1,
    )


def _loglikelihoods(result: dict[str, Any]) -> list[float]:
    return [float(resp[0][0]) for sample in result["samples"][TASK] for resp in sample["resps"]]


def test_local_completions_matches_the_hf_backend(
    server: RunningServer, tiny_model_dir: Path, task_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    served = _run(
        "local-completions",
        f"model={MODEL},base_url={server.openai_url}/completions,tokenizer_backend=huggingface,"
        f"tokenizer={tiny_model_dir},num_concurrent=1,max_retries=1",
        task_dir,
    )
    reference = _run("hf", f"pretrained={tiny_model_dir},dtype=float32,device=cpu", task_dir)
    ours, theirs = _loglikelihoods(served), _loglikelihoods(reference)
    assert len(ours) == len(theirs) == DOCS * 4
    assert ours == pytest.approx(theirs, abs=2e-3)
    for metric in ("acc,none", "acc_norm,none"):
        assert served["results"][TASK][metric] == reference["results"][TASK][metric]
