"""The server's settings: one pydantic-settings model, read from `LLMSTACK_*` environment variables and from
command-line flags generated from the same fields (`serve --help` prints each field's description).

Invariant: a `ServeSettings` object is complete and valid; every problem (placeholder keys, bad adapter specs,
missing files) is reported together at start-up, never later in a request.
"""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from adapters.discovery import collect, parse_spec
from core.errors import ConfigError
from core.settings import StackSettings, placeholder_reason


class ServeSettings(StackSettings):
    """Everything `serve` can be told. Flag `--foo-bar` sets field `foo_bar`; env `LLMSTACK_FOO_BAR` too."""

    model_config = SettingsConfigDict(env_prefix="LLMSTACK_")

    model: str | None = Field(
        None, description="model folder (HF format or a quantized artifact); default: the embedded SmolLM2"
    )
    served_model_name: str | None = Field(
        None, description="name clients use in `model`; default: the model folder's name"
    )
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    tensor_parallel_size: int = Field(
        1,
        ge=1,
        description="split the model over this many GPUs (CPU: workers; needs VLLM_CPU_OMP_THREADS_BIND)",
    )
    pipeline_parallel_size: int = Field(
        1, ge=1, description="split the model's layers over this many workers (with --nnodes: across nodes)"
    )
    data_parallel_size: int = Field(
        1,
        ge=1,
        description="engine replicas behind this server, balanced by vLLM by load (CPU: one "
        "VLLM_CPU_OMP_THREADS_BIND entry per local rank, e.g. '0|1')",
    )
    data_parallel_size_local: int | None = Field(
        None,
        ge=0,
        description="data-parallel ranks started on this node; the rest join headless from other nodes "
        "(default: all of --data-parallel-size)",
    )
    data_parallel_address: str | None = Field(
        None, description="address of this node that headless data-parallel ranks connect to"
    )
    data_parallel_rpc_port: int | None = Field(
        None, ge=1, le=65535, description="port for the data-parallel handshake at --data-parallel-address"
    )
    data_parallel_start_rank: int | None = Field(
        None, ge=0, description="first data-parallel rank run on this node (headless nodes)"
    )
    nnodes: int = Field(1, ge=1, description="nodes one engine's tensor/pipeline parallel workers span")
    node_rank: int = Field(0, ge=0, description="this node's rank among --nnodes")
    master_addr: str = Field(
        "127.0.0.1", description="node 0's address for multi-node tensor/pipeline parallel (--nnodes > 1)"
    )
    master_port: int = Field(
        29501, ge=1, le=65535, description="node 0's port for multi-node tensor/pipeline parallel"
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="weight/activation dtype"
    )
    max_model_len: int | None = Field(None, ge=1, description="context length; default: the model's")
    api_key: list[SecretStr] = Field(
        default_factory=list,
        description="accepted API key (repeatable); no keys at all: auth off",
    )
    api_keys_file: Path | None = Field(
        None, description="file of API keys, one per line as `name:key` or `key`; `#` starts a comment"
    )
    max_concurrent_requests: int = Field(64, ge=1, description="requests admitted into the engine at once")
    max_queued_requests: int = Field(
        256, ge=0, description="requests waiting for admission; beyond this: 429 with Retry-After"
    )
    retry_after_seconds: int = Field(1, ge=1, description="Retry-After sent with 429")
    lora_modules: list[str] = Field(
        default_factory=list,
        description="LoRA adapters served from start-up, as `name=path` (several)",
    )
    enable_lora: bool = Field(False, description="enable LoRA adapters (implied by --lora-modules)")
    max_loras: int = Field(4, ge=1, description="adapters resident in one batch")
    max_lora_rank: int = Field(16, ge=1, description="largest adapter rank accepted")
    lora_dir: Path | None = Field(
        None, description="serve every PEFT adapter folder in this directory, named after its folder"
    )
    lora_registry: Path | None = Field(
        None, description="YAML file of adapters to serve: `adapters: [{name: ..., path: ...}]`"
    )
    adapter_unload_timeout_seconds: float = Field(
        30.0,
        ge=0,
        description="adapter unload: how long its in-flight requests may run before they are cancelled",
    )
    admin_api_key: list[SecretStr] = Field(
        default_factory=list,
        description="key allowed to load/unload adapters at run time (repeatable); needed once keys are set",
    )
    max_num_seqs: int | None = Field(
        None, ge=1, description="sequences the engine schedules in one step; default: vLLM's for the device"
    )
    max_num_batched_tokens: int | None = Field(
        None, ge=1, description="tokens the engine processes in one step; default: vLLM's for the device"
    )
    cpu_kvcache_space_gib: int | None = Field(
        None, ge=1, description="CPU engine: KV cache size in GiB (sets VLLM_CPU_KVCACHE_SPACE; default 1)"
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="GPU engine: fraction of GPU memory for weights and KV cache"
    )
    enforce_eager: bool | None = Field(
        None, description="disable CUDA graphs / torch.compile; default: on for CPU, off for GPU"
    )
    tool_call_parser: str | None = Field(
        "hermes",
        description="vLLM tool-call parser for tool_choice 'auto' (as vLLM's --tool-call-parser); the "
        "fallback tool prompt for templates without tools uses hermes' format",
    )
    max_request_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="larger bodies get 413")
    drain_timeout_seconds: float = Field(
        30.0, ge=0, description="on SIGTERM: how long in-flight requests may finish before exit"
    )
    engine_restart_max: int = Field(
        3,
        ge=0,
        description="engine failures (death, hang, failed restart) tolerated within "
        "--engine-restart-window-seconds; one more and the server exits non-zero (0: exit at the first)",
    )
    engine_restart_window_seconds: float = Field(
        300.0, gt=0, description="the window over which engine failures are counted"
    )
    engine_restart_backoff_seconds: float = Field(
        1.0, ge=0, description="wait before replacing the engine, doubled per failure in the window (max 30s)"
    )
    engine_hang_timeout_seconds: float = Field(
        60.0,
        ge=0,
        description="an engine with requests in flight and no output for this long is hung: killed and "
        "replaced (0: off; long requests are fine as long as tokens come)",
    )
    engine_wait_seconds: float = Field(
        0.0, ge=0, description="while the engine is replaced: how long a new request waits for it before 503"
    )
    metrics_max_model_labels: int = Field(
        16, ge=1, description="distinct adapter names as metric labels; more are labelled `other`"
    )
    metrics_max_key_labels: int = Field(
        16, ge=1, description="distinct API key ids as metric labels; more are labelled `other`"
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")

    @field_validator("lora_modules")
    @classmethod
    def _lora_specs(cls, specs: list[str]) -> list[str]:
        try:
            collect(specs)
        except ConfigError as err:
            raise ValueError(str(err)) from None
        return specs

    @field_validator("api_key")
    @classmethod
    def _keys_are_real(cls, keys: list[SecretStr]) -> list[SecretStr]:
        _refuse_placeholders([(f"API key #{i + 1}", k.get_secret_value()) for i, k in enumerate(keys)])
        return keys

    @field_validator("api_keys_file")
    @classmethod
    def _file_keys_are_real(cls, path: Path | None) -> Path | None:
        if path is not None:
            try:
                entries = parse_keys_file(path.read_text())
            except OSError as err:
                raise ValueError(f"cannot read the API keys file {path}: {err.strerror}") from None
            if not entries:
                raise ValueError(f"the API keys file {path} holds no key")
            _refuse_placeholders(
                [(f"key {name or i + 1!r} in {path}", k) for i, (name, k) in enumerate(entries)]
            )
        return path

    def adapters(self) -> dict[str, Path]:
        """The `--lora-modules` specs as {name: path}, in the order given."""
        return {spec.name: spec.path for spec in map(parse_spec, self.lora_modules)}

    def lora_enabled(self) -> bool:
        return (
            self.enable_lora
            or bool(self.lora_modules)
            or self.lora_dir is not None
            or self.lora_registry is not None
        )


def _refuse_placeholders(keys: list[tuple[str, str]]) -> None:
    problems = [f"{where}: {reason}" for where, key in keys if (reason := placeholder_reason(key))]
    if problems:
        raise ValueError("refusing placeholder API keys: " + "; ".join(problems))


def parse_keys_file(text: str) -> list[tuple[str | None, str]]:
    """(name or None, key) for each non-empty, non-comment line of an API keys file."""
    entries: list[tuple[str | None, str]] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, key = line.partition(":")
        entries.append((name.strip(), key.strip()) if sep else (None, line))
    return entries


def _is_list(annotation: Any) -> bool:
    if typing.get_origin(annotation) is list:
        return True
    return (
        any(_is_list(a) for a in typing.get_args(annotation))
        if isinstance(annotation, types.UnionType)
        else False
    )


def _is_bool(annotation: Any) -> bool:
    return annotation is bool or (
        isinstance(annotation, types.UnionType) and bool in typing.get_args(annotation)
    )


def build_parser() -> argparse.ArgumentParser:
    """An argparse parser with one flag per settings field.

    Hand-written (about 20 lines) rather than pydantic-settings' CLI source because the flags follow vLLM's
    conventions: `--lora-modules a=x b=y` (several values after one flag) and a repeatable `--api-key`.
    Flags not given stay unset, so environment variables still apply.
    """
    parser = argparse.ArgumentParser(
        prog="serve",
        description="OpenAI-compatible server on vLLM. Every flag can also be set as LLMSTACK_<FLAG_NAME>.",
        argument_default=argparse.SUPPRESS,
    )
    for name, field in ServeSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = field.get_default(call_default_factory=True)
        shown = "" if default is None or default == [] else f" (default: {default})"
        help_text = f"{field.description}{shown}"
        if _is_bool(field.annotation):
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, help=help_text)
        elif _is_list(field.annotation):
            metavar = name.removesuffix("s").upper()
            parser.add_argument(flag, dest=name, nargs="+", action="extend", metavar=metavar, help=help_text)
        elif typing.get_origin(field.annotation) is Literal:
            parser.add_argument(flag, dest=name, choices=typing.get_args(field.annotation), help=help_text)
        else:
            parser.add_argument(flag, dest=name, metavar=name.upper(), help=help_text)
    return parser


def parse_settings(argv: list[str] | None = None) -> ServeSettings:
    """Settings from flags (`argv`) over environment variables over defaults."""
    values = vars(build_parser().parse_args(argv))
    return ServeSettings(**values)
