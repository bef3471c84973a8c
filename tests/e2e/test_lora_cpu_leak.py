"""The CPU LoRA leak (DESIGN.md, vllm-project/vllm#48421) on the real engine, in-process.

With `max_loras=3` and three adapters in one batch, every adapter slot is full; vLLM's own CPU LoRA ops read a
base request's index -1 as "the last slot", so the base request gets an adapter applied. The engine runs
`serve.vllm_plugin.punica_cpu`'s wrapper instead (installed by vLLM's general-plugin loader, the entry point
of this project), which never touches a row without an adapter. The requests are interleaved (base, a, b, c,
base, ...), so the wrapper's rows are out of slot order and, at decode steps, take its padded batched path;
each adapter request in the mix must equal the same request alone. The second test puts vLLM's own wrapper
back into the running engine to show that the first one can fail.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.lora import build_lora_adapter

PROMPTS = ["The quick brown fox", "def main():\n    return"]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("leak-adapters")
    return [build_lora_adapter(tiny_model_dir, root / f"a{seed}", seed=seed) for seed in (1, 2, 3)]


@pytest.fixture(scope="module")
def llm(tiny_model_dir: Path) -> Iterator[Any]:
    from vllm import LLM

    with pytest.MonkeyPatch.context() as env:
        env.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        engine = LLM(
            model=str(tiny_model_dir),
            dtype="float32",  # the tiny model's logits are nearly flat: bf16 rounding alone can flip a token
            enable_lora=True,
            max_loras=3,
            max_lora_rank=8,
            max_model_len=128,
            max_num_seqs=8,
            enforce_eager=True,
            seed=0,
        )
        yield engine
        del engine


def _greedy(llm: Any, prompts: list[str], loras: list[Any]) -> list[list[int]]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
    return [list(out.outputs[0].token_ids) for out in outputs]


Outputs = dict[tuple[int, str], list[int]]  # (adapter number, 0: base; prompt) -> greedy token ids


def _mixed_batch(llm: Any, adapters: list[Path]) -> tuple[Outputs, Outputs]:
    """(every request batched with all the others, interleaved; every request alone)."""
    from vllm.lora.request import LoRARequest

    loras = [None] + [LoRARequest(f"a{i}", i, str(path)) for i, path in enumerate(adapters, 1)]
    jobs = [(i, prompt) for prompt in PROMPTS for i in range(len(loras))]
    batched = _greedy(llm, [prompt for _, prompt in jobs], [loras[i] for i, _ in jobs])
    alone = {(i, prompt): _greedy(llm, [prompt], [loras[i]])[0] for i, prompt in jobs}
    return dict(zip(jobs, batched, strict=True)), alone


def _punica_wrappers(worker: Any) -> list[str]:
    """The class names of the engine's punica wrappers (runs in the worker)."""
    manager = worker.model_runner.lora_manager._adapter_manager
    return [type(w).__name__ for w in manager.punica_wrapper_mapping.values()]


def _use_vllms_own_wrapper(worker: Any, use: bool) -> None:
    """Swap the engine's punica wrappers to vLLM's `PunicaWrapperCPU` (or back); runs in the worker. Both
    classes fill the same index tensors on the next step's `update_metadata`, so the swap takes effect
    then."""
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    from serve.vllm_plugin.punica_cpu import PunicaWrapperCPUGrouped

    for wrapper in worker.model_runner.lora_manager._adapter_manager.punica_wrapper_mapping.values():
        wrapper.__class__ = PunicaWrapperCPU if use else PunicaWrapperCPUGrouped


def test_mixed_batch_equals_each_request_alone(llm: Any, adapters: list[Path]) -> None:
    assert llm.collective_rpc(_punica_wrappers) == [["PunicaWrapperCPUGrouped"]]
    batched, alone = _mixed_batch(llm, adapters)
    # The adapters really change the output, otherwise a leak would be invisible.
    for prompt in PROMPTS:
        assert len({tuple(alone[(i, prompt)]) for i in range(len(adapters) + 1)}) == len(adapters) + 1
    assert batched == alone


def test_with_vllms_own_cpu_wrapper_the_base_request_leaks(llm: Any, adapters: list[Path]) -> None:
    """Proves the test above can fail: with vLLM's own CPU LoRA ops, the batched base output changes."""
    llm.collective_rpc(_use_vllms_own_wrapper, args=(True,))
    try:
        batched, alone = _mixed_batch(llm, adapters)
    finally:
        llm.collective_rpc(_use_vllms_own_wrapper, args=(False,))
    base = [(0, prompt) for prompt in PROMPTS]
    if all(batched[job] == alone[job] for job in base):
        pytest.skip(
            "vLLM's own CPU LoRA ops no longer leak: serve/vllm_plugin/punica_cpu.py may be removable"
        )
    assert any(batched[job] != alone[job] for job in base)
