"""`serve`'s engine flags reach vLLM's `AsyncEngineArgs` unchanged (and vLLM's own defaults otherwise)."""

from __future__ import annotations

from pathlib import Path

from serve.engine.vllm_engine import engine_args
from serve.settings import parse_settings


def test_engine_flags_map_to_vllm_arguments(tmp_path: Path) -> None:
    settings = parse_settings(
        [
            "--served-model-name", "m",
            "--tensor-parallel-size", "2",
            "--dtype", "float32",
            "--max-model-len", "512",
            "--max-num-seqs", "8",
            "--max-num-batched-tokens", "1024",
            "--max-loras", "3",
            "--max-lora-rank", "32",
            "--enable-lora",
            "--gpu-memory-utilization", "0.5",
            "--no-enforce-eager",
        ]
    )  # fmt: skip
    args = engine_args(settings, tmp_path)
    assert (args.model, args.served_model_name, args.tensor_parallel_size, args.dtype) == (
        str(tmp_path), "m", 2, "float32",
    )  # fmt: skip
    assert (args.max_model_len, args.max_num_seqs, args.max_num_batched_tokens) == (512, 8, 1024)
    assert (args.enable_lora, args.max_loras, args.max_lora_rank) == (True, 3, 32)
    assert (args.gpu_memory_utilization, args.enforce_eager) == (0.5, False)


def test_unset_flags_leave_vllm_defaults(tmp_path: Path) -> None:
    from vllm import AsyncEngineArgs

    args = engine_args(parse_settings([]), tmp_path)
    defaults = AsyncEngineArgs(model=str(tmp_path))
    assert args.served_model_name == tmp_path.name
    assert (args.max_model_len, args.max_num_seqs, args.max_num_batched_tokens) == (
        defaults.max_model_len, defaults.max_num_seqs, defaults.max_num_batched_tokens,
    )  # fmt: skip
    assert args.enforce_eager is True  # the CPU build: no CUDA graphs / compilation
    assert args.enable_lora is False
