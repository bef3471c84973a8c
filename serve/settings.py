"""The server's settings: vLLM's own arguments (engine and front end, parsed by vLLM's parser) plus the
stack's own settings (one pydantic-settings model: `LLMSTACK_*` environment variables, flags made from it).

Invariants:
- one source per setting: an engine or front-end option of vLLM is defined by vLLM alone (its parser, its
  default, its meaning) and reaches the engine through `AsyncEngineArgs.from_cli_args`; `ServeSettings`
  fields are only what vLLM does not have (keys file, admission, adapter registry, drain, metric labels);
- a `ServeSettings` object is complete and valid; every problem (placeholder keys, bad adapter specs, an
  option this stack cannot honour) is reported together at start-up, never later in a request.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, PrivateAttr, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from adapters.discovery import AdapterSpec, collect
from core.errors import ConfigError
from core.settings import StackSettings, placeholder_reason

if TYPE_CHECKING:
    from vllm.utils.argparse_utils import FlexibleArgumentParser

ENV_PREFIX = "LLMSTACK_"
STACK_GROUP = "llmstack"


class ServeSettings(StackSettings):
    """The stack's own settings. Flag `--foo-bar` sets field `foo_bar`; env `LLMSTACK_FOO_BAR` too.

    `vllm` holds vLLM's parsed engine and front-end arguments (`serve --help=Frontend`, `--help=ModelConfig`
    ...), exactly as `vllm serve` would have them."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX)

    api_keys_file: Path | None = Field(
        None, description="file of API keys, one per line as `name:key` or `key`; `#` starts a comment"
    )
    admin_api_key: list[SecretStr] = Field(
        default_factory=list,
        description="key allowed to load/unload adapters at run time (repeatable); needed once keys are set",
    )
    max_concurrent_requests: int = Field(64, ge=1, description="requests admitted into the engine at once")
    max_queued_requests: int = Field(
        256, ge=0, description="requests waiting for admission; beyond this: 429 with Retry-After"
    )
    retry_after_seconds: int = Field(1, ge=1, description="Retry-After sent with 429")
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
    cpu_kvcache_space_gib: int | None = Field(
        None, ge=1, description="CPU engine: KV cache size in GiB (sets VLLM_CPU_KVCACHE_SPACE; default 1)"
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

    _vllm: argparse.Namespace = PrivateAttr(default_factory=argparse.Namespace)
    _explicit: frozenset[str] = PrivateAttr(default_factory=frozenset)

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

    @field_validator("admin_api_key")
    @classmethod
    def _admin_keys_are_real(cls, keys: list[SecretStr]) -> list[SecretStr]:
        _refuse_placeholders([(f"admin key #{i + 1}", k.get_secret_value()) for i, k in enumerate(keys)])
        return keys

    # --- vLLM's arguments -----------------------------------------------------------------------------
    @property
    def vllm(self) -> argparse.Namespace:
        """vLLM's engine and front-end arguments as its own parser produced them."""
        return self._vllm

    def with_vllm(self, **changes: Any) -> ServeSettings:
        """A copy whose vLLM arguments have `changes` applied (this object is left as it is)."""
        copy = self.model_copy()
        copy._vllm = argparse.Namespace(**{**vars(self._vllm), **changes})
        return copy

    def explicit(self, dest: str) -> bool:
        """Whether vLLM's option `dest` was given (flag, `--config` file or environment)."""
        return dest in self._explicit

    @property
    def model(self) -> str | None:
        """The model to serve (`--model` or vLLM's positional model); None: the embedded default."""
        return getattr(self._vllm, "model", None)

    @property
    def host(self) -> str:
        return self._vllm.host or "127.0.0.1"

    @property
    def port(self) -> int:
        return int(self._vllm.port)

    @property
    def api_keys(self) -> list[str]:
        """`--api-key` values (vLLM's flag: repeatable, several values after one flag)."""
        return list(self._vllm.api_key or [])

    @property
    def log_level(self) -> str:
        """vLLM's `--log-level` (its logging config's level), also the level of the server's own loggers."""
        return str(getattr(self._vllm, "log_level", None) or "info").lower()

    @property
    def tool_call_parser(self) -> str:
        return str(self._vllm.tool_call_parser)

    def served_model_names(self, model_dir: Path) -> list[str]:
        """`--served-model-name` (first: the name answered with; all: accepted); default: the folder name."""
        return list(self._vllm.served_model_name or [model_dir.name])

    def adapter_specs(self) -> list[AdapterSpec]:
        """The start-up adapters of `--lora-modules`, `--lora-dir` and `--lora-registry` (problems
        together)."""
        modules = [f"{m.name}={m.path}" for m in self._vllm.lora_modules or []]
        return collect(
            modules,
            [self.lora_dir] if self.lora_dir else [],
            [self.lora_registry] if self.lora_registry else [],
        )

    def adapters(self) -> dict[str, Path]:
        """The `--lora-modules` adapters as {name: path}, in the order given."""
        return {m.name: Path(m.path) for m in self._vllm.lora_modules or []}

    def lora_enabled(self) -> bool:
        return (
            bool(self._vllm.enable_lora)
            or bool(self._vllm.lora_modules)
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


def add_stack_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per `ServeSettings` field, in their own group. Flags not given stay unset (SUPPRESS), so
    `LLMSTACK_*` environment variables still apply; pydantic validates the values."""
    group = parser.add_argument_group(
        STACK_GROUP, "The stack's own settings (not vLLM's); each can also be set as LLMSTACK_<FLAG_NAME>."
    )
    for name, field in ServeSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = field.get_default(call_default_factory=True)
        shown = "" if default is None or default == [] else f" (default: {default})"
        help_text = f"{field.description}{shown}"
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
        if _is_bool(field.annotation):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif _is_list(field.annotation):
            metavar = name.removesuffix("s").upper()
            group.add_argument(flag, nargs="+", action="extend", metavar=metavar, **kwargs)
        elif typing.get_origin(field.annotation) is Literal:
            group.add_argument(flag, choices=typing.get_args(field.annotation), **kwargs)
        else:
            group.add_argument(flag, metavar=name.upper(), **kwargs)


def build_parser() -> FlexibleArgumentParser:
    """vLLM's `vllm serve` parser (`make_arg_parser`: positional model, engine and front-end arguments,
    `--config file.yaml`) with the stack's group added."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    class ServeParser(FlexibleArgumentParser):
        """A usage error is one ConfigError (the CLI prints one line and exits 2), not argparse's usage
        text and exit."""

        def error(self, message: str) -> typing.NoReturn:
            raise ConfigError(message)

    parser = ServeParser(
        prog="serve",
        usage="serve [model] [options]",
        description="OpenAI-compatible server on vLLM. Takes `vllm serve`'s options (same names, defaults "
        "and meaning) plus the stack's own (group llmstack). `--help=<group>` lists a group's options, "
        "`--help=all` every option.",
    )
    make_arg_parser(parser)
    add_stack_arguments(parser)
    return parser


def stack_dests() -> frozenset[str]:
    return frozenset(ServeSettings.model_fields)


def parse_settings(argv: list[str] | None = None) -> ServeSettings:
    """Settings from flags (`argv`) over environment variables over defaults; vLLM's arguments as its
    parser gives them (`--model` or the positional model; unset: the embedded default model).

    Raises pydantic's ValidationError for a bad stack setting and ConfigError for a bad vLLM argument
    combination this stack refuses (see serve.frontend)."""
    from serve import frontend

    parser = build_parser()
    argv = frontend.env_arguments(parser, stack_dests()) + list(argv if argv is not None else sys.argv[1:])
    namespace = parser.parse_args(argv)
    explicit = frontend.explicit_dests(parser, argv)
    stack = {k: v for k, v in vars(namespace).items() if k in stack_dests()}
    vllm = argparse.Namespace(**{k: v for k, v in vars(namespace).items() if k not in stack_dests()})
    frontend.resolve(parser, vllm, explicit)
    settings = ServeSettings(**stack)
    settings._vllm = vllm
    settings._explicit = frozenset(explicit)
    return settings
