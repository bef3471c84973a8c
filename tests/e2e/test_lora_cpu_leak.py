"""The CPU LoRA leak (DESIGN.md, vllm-project/vllm#48421) on the real engine, in-process.

With `max_loras=2` and two adapters in one batch, both adapter slots are full; vLLM's CPU ops read a
base request's index -1 as "the last slot", so without `serve.vllm_plugin`'s fix the base request gets an
adapter applied. The fix is installed by vLLM's general-plugin loader (the entry point of this project).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from serve.vllm_plugin import lora_fix as vllm_plugin
from tests.support.lora import build_lora_adapter

PROMPTS = ["The quick brown fox", "def main():\n    return"]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("leak-adapters")
    return [build_lora_adapter(tiny_model_dir, root / f"a{seed}", seed=seed) for seed in (1, 2)]


@pytest.fixture(scope="module")
def llm(tiny_model_dir: Path) -> Iterator[Any]:
    from vllm import LLM

    with pytest.MonkeyPatch.context() as env:
        env.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        engine = LLM(
            model=str(tiny_model_dir),
            enable_lora=True,
            max_loras=2,
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


def _mixed_batch(llm: Any, adapters: list[Path]) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """(base requests batched with both adapters, base requests alone, adapter requests in that batch)."""
    from vllm.lora.request import LoRARequest

    lora_a = LoRARequest("a", 1, str(adapters[0]))
    lora_b = LoRARequest("b", 2, str(adapters[1]))
    prompts = [*PROMPTS, *PROMPTS, *PROMPTS]
    loras = [None] * len(PROMPTS) + [lora_a] * len(PROMPTS) + [lora_b] * len(PROMPTS)
    batched = _greedy(llm, prompts, loras)
    alone = [_greedy(llm, [prompt], [None])[0] for prompt in PROMPTS]
    return batched[: len(PROMPTS)], alone, batched[len(PROMPTS) :]


def test_base_request_batched_with_adapters_equals_base_alone(llm: Any, adapters: list[Path]) -> None:
    base_batched, base_alone, adapter_outputs = _mixed_batch(llm, adapters)
    # The adapters really change the output, otherwise a leak would be invisible.
    assert all(out not in base_alone for out in adapter_outputs)
    assert base_batched == base_alone


def test_without_the_fix_the_base_request_leaks(
    llm: Any, adapters: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Proves the test above can fail: with vLLM's original ops restored, the base output changes."""
    from vllm.lora.ops.torch_ops import lora_ops

    original_shrink = getattr(lora_ops.bgmv_shrink, "__wrapped__", None)
    if original_shrink is None or not vllm_plugin.ops_leak(original_shrink):
        pytest.skip("the installed vLLM's CPU LoRA ops no longer leak: remove fix 2 of serve.vllm_plugin")
    for module_name in (vllm_plugin.LORA_OPS_MODULE, *vllm_plugin.LORA_OPS_IMPORTERS):
        module = sys.modules.get(module_name)
        for op in vllm_plugin.BGMV_OPS:
            if module is not None and hasattr(getattr(module, op, None), "__wrapped__"):
                monkeypatch.setattr(module, op, getattr(module, op).__wrapped__)
    base_batched, base_alone, _ = _mixed_batch(llm, adapters)
    assert base_batched != base_alone
