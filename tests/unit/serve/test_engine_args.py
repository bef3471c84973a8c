"""`serve`'s engine flags reach vLLM's `AsyncEngineArgs` unchanged (and vLLM's own defaults otherwise)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

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


# Scale-out flags: each `serve` flag carries the name of vLLM's own flag and must give the `AsyncEngineArgs`
# field that `vllm serve` gives for the same flag and value.
_PARALLEL_FLAGS = [
    ("--pipeline-parallel-size", "2", "pipeline_parallel_size", 2),
    ("--data-parallel-size", "4", "data_parallel_size", 4),
    ("--data-parallel-size-local", "0", "data_parallel_size_local", 0),
    ("--data-parallel-size-local", "2", "data_parallel_size_local", 2),
    ("--data-parallel-address", "10.1.2.3", "data_parallel_address", "10.1.2.3"),
    ("--data-parallel-rpc-port", "13345", "data_parallel_rpc_port", 13345),
    ("--data-parallel-start-rank", "3", "data_parallel_start_rank", 3),
    ("--nnodes", "2", "nnodes", 2),
    ("--node-rank", "1", "node_rank", 1),
    ("--master-addr", "10.9.8.7", "master_addr", "10.9.8.7"),
    ("--master-port", "29999", "master_port", 29999),
]


@pytest.mark.parametrize(("flag", "value", "field", "expected"), _PARALLEL_FLAGS)
def test_parallel_flag_maps_like_vllms_own_flag(
    tmp_path: Path, flag: str, value: str, field: str, expected: object
) -> None:
    from vllm import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    ours = getattr(engine_args(parse_settings([flag, value]), tmp_path), field)
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    vllms = getattr(
        AsyncEngineArgs.from_cli_args(parser.parse_args(["--model", str(tmp_path), flag, value])), field
    )
    assert ours == vllms == expected


@pytest.mark.parametrize("field", sorted({field for _, _, field, _ in _PARALLEL_FLAGS}))
def test_parallel_flags_default_to_vllms_defaults(tmp_path: Path, field: str) -> None:
    from vllm import AsyncEngineArgs

    assert getattr(engine_args(parse_settings([]), tmp_path), field) == getattr(
        AsyncEngineArgs(model=str(tmp_path)), field
    )


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--pipeline-parallel-size", "0"),
        ("--data-parallel-size", "0"),
        ("--data-parallel-size-local", "-1"),
        ("--data-parallel-rpc-port", "70000"),
        ("--data-parallel-start-rank", "-1"),
        ("--nnodes", "0"),
        ("--node-rank", "-1"),
        ("--master-port", "0"),
    ],
)
def test_parallel_flags_refuse_out_of_range_values(flag: str, value: str) -> None:
    with pytest.raises(ValidationError, match=flag.removeprefix("--").replace("-", "_")):
        parse_settings([flag, value])


def test_one_headless_rank_joins_a_two_rank_server(tmp_path: Path) -> None:
    """The API node of the documented two-node layout: one local rank, the handshake address, and vLLM's
    parallel config says rank 1 comes from elsewhere."""
    settings = parse_settings(
        [
            "--data-parallel-size", "2",
            "--data-parallel-size-local", "1",
            "--data-parallel-address", "127.0.0.1",
            "--data-parallel-rpc-port", "13345",
        ]
    )  # fmt: skip
    args = engine_args(settings, tmp_path)
    assert (args.data_parallel_size, args.data_parallel_size_local) == (2, 1)
    assert (args.data_parallel_address, args.data_parallel_rpc_port) == ("127.0.0.1", 13345)
    assert args.data_parallel_start_rank is None  # rank 0 on the API node
