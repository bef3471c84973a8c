"""`serve`'s engine arguments are vLLM's: `AsyncEngineArgs.from_cli_args` of the same command line gives the
same fields as `vllm serve`, except the stack's documented CPU defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from serve.engine.vllm_engine import engine_args
from serve.settings import parse_settings

_COMMAND_LINE = [
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
    "--enable-prefix-caching",
    "--kv-cache-dtype", "fp8",
    "--max-logprobs", "3",
    "--generation-config", "vllm",
    "--override-generation-config", '{"temperature": 0.25}',
    "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}',
    "--stream-interval", "4",
    "--data-parallel-size", "2",
    "--data-parallel-size-local", "1",
    "--data-parallel-address", "127.0.0.1",
    "--data-parallel-rpc-port", "13345",
]  # fmt: skip


def _vllms(argv: list[str], model: Path) -> object:
    from vllm import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = make_arg_parser(FlexibleArgumentParser()).parse_args([str(model), *argv])
    args.model = args.model_tag
    return AsyncEngineArgs.from_cli_args(args)


def test_engine_fields_equal_vllm_serves_for_the_same_command_line(tmp_path: Path) -> None:
    ours = engine_args(parse_settings([str(tmp_path), *_COMMAND_LINE]), tmp_path)
    vllms = _vllms(_COMMAND_LINE, tmp_path)
    # the stack fills in the served name (vLLM: the model path) and keeps its own engine statistics on
    differing = {k for k in vars(vllms) if getattr(ours, k) != getattr(vllms, k)}
    assert differing == {"served_model_name"}
    assert ours.served_model_name == [tmp_path.name]
    assert ours.max_num_seqs == 8 and ours.enable_prefix_caching is True and ours.stream_interval == 4


def test_unset_options_are_vllms_defaults_but_the_cpu_stack_defaults(tmp_path: Path) -> None:
    ours = engine_args(parse_settings([]), tmp_path)
    vllms = _vllms([], tmp_path)
    differing = {k for k in vars(vllms) if getattr(ours, k) != getattr(vllms, k)}
    assert differing == {"served_model_name", "enforce_eager"}
    assert ours.enforce_eager is True  # the CPU build: no CUDA graphs / compilation unless asked for
    assert not ours.enable_lora


@pytest.mark.parametrize("flag", ["--lora-modules", "--lora-dir"])
def test_lora_is_on_when_adapters_are_configured(tmp_path: Path, flag: str) -> None:
    value = f"a={tmp_path}" if flag == "--lora-modules" else str(tmp_path)
    assert engine_args(parse_settings([flag, value]), tmp_path).enable_lora is True


def test_one_headless_rank_joins_a_two_rank_server(tmp_path: Path) -> None:
    """The API node of the documented two-node layout: one local rank, the handshake address, and vLLM's
    parallel config says rank 1 comes from elsewhere."""
    args = engine_args(parse_settings(_COMMAND_LINE[-8:]), tmp_path)
    assert (args.data_parallel_size, args.data_parallel_size_local) == (2, 1)
    assert (args.data_parallel_address, args.data_parallel_rpc_port) == ("127.0.0.1", 13345)
    assert args.data_parallel_start_rank is None  # rank 0 on the API node
