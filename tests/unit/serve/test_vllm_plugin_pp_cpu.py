"""The plugin's pipeline-parallel fix (`serve.vllm_plugin.pp_cpu`): which runners get the later stages' input
buffer, and that the wrap of vLLM's CPU runner is applied once. End to end (PP = 2 on one node and across two
"nodes", answers equal to one engine's): tests/e2e/test_data_parallel.py, opt-in `--run-slow`."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from vllm.v1.worker.cpu_model_runner import CPUModelRunner

from serve.vllm_plugin import pp_cpu


class _Model:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def make_empty_intermediate_tensors(self, **kwargs: Any) -> dict[str, torch.Tensor]:
        self.calls.append(kwargs)
        return {"hidden_states": torch.zeros(kwargs["batch_size"], 4, dtype=kwargs["dtype"])}


def _runner(buffer: Any = None) -> Any:
    return SimpleNamespace(
        intermediate_tensors=buffer,
        model=_Model(),
        max_num_tokens=64,
        model_config=SimpleNamespace(dtype=torch.float32),
        device=torch.device("cpu"),
    )


def _pp_rank(monkeypatch: pytest.MonkeyPatch, first: bool) -> None:
    monkeypatch.setattr(
        "vllm.distributed.parallel_state.get_pp_group", lambda: SimpleNamespace(is_first_rank=first)
    )


def test_a_later_stage_gets_a_buffer_sized_like_the_gpu_runners(monkeypatch: pytest.MonkeyPatch) -> None:
    _pp_rank(monkeypatch, first=False)
    runner = _runner()
    assert pp_cpu.allocate_intermediate_tensors(runner)
    assert runner.model.calls == [{"batch_size": 64, "dtype": torch.float32, "device": torch.device("cpu")}]
    assert runner.intermediate_tensors["hidden_states"].shape == (64, 4)


def test_the_first_stage_and_an_existing_buffer_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    _pp_rank(monkeypatch, first=True)
    first = _runner()
    assert not pp_cpu.allocate_intermediate_tensors(first)
    assert first.intermediate_tensors is None and not first.model.calls

    _pp_rank(monkeypatch, first=False)
    existing = {"hidden_states": torch.ones(2, 4)}
    later = _runner(existing)
    assert not pp_cpu.allocate_intermediate_tensors(later)
    assert later.intermediate_tensors is existing and not later.model.calls


def test_the_runner_is_wrapped_once_and_allocates_after_vllms_kv_cache_setup(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    order: list[str] = []

    def vllm_initialize_kv_cache(self: Any, *args: Any, **kwargs: Any) -> None:
        order.append("vllm")

    monkeypatch.setattr(CPUModelRunner, "initialize_kv_cache", vllm_initialize_kv_cache)
    monkeypatch.setattr(pp_cpu, "allocate_intermediate_tensors", lambda runner: order.append("buffer"))
    pp_cpu.patch_runner()
    wrapped = CPUModelRunner.initialize_kv_cache
    pp_cpu.patch_runner()
    assert CPUModelRunner.initialize_kv_cache is wrapped  # idempotent

    wrapped(object(), "kv_cache_config")
    assert order == ["vllm", "buffer"]
