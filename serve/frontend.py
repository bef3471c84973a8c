"""vLLM's `vllm serve` options on this server: which front-end options it honours, which it refuses, the
stack's CPU defaults, and `LLMSTACK_<FLAG>` environment variables for vLLM's flags.

Invariants:
- every option of vLLM's serve parser that is not an engine argument (`AsyncEngineArgs`) is listed exactly
  once below: HONOURED (it has its effect here), NOT_APPLICABLE (it only concerns something this server
  does not have, so it cannot change anything here), or REFUSED (set to anything but vLLM's default, the
  server refuses to start with one line naming it and why). A test compares these lists with vLLM's parser,
  so a vLLM upgrade that adds an option fails a test instead of being silently ignored;
- engine arguments all reach the engine through `AsyncEngineArgs.from_cli_args`; the only ones listed are
  in REFUSED, where they need a front end this server does not have;
- a stack default differs from vLLM's only where listed in STACK_DEFAULTS, and only when the user did not
  give the option (explicitly, in `--config` or in the environment).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable
from typing import Any

from core.errors import ConfigError
from core.settings import placeholder_reason

ENV_PREFIX = "LLMSTACK_"

# Front-end options (vLLM's FrontendArgs and the extras of its serve parser) and where each takes effect.
HONOURED: dict[str, str] = {
    "headless": "engine ranks only, no API server (as `python -m serve.headless`)",
    "model_tag": "the positional model, as `vllm serve MODEL` (serve.frontend.resolve)",
    "config": "vLLM's parser reads the YAML file's options",
    "host": "uvicorn's listening address (serve.cli)",
    "port": "uvicorn's port (serve.cli)",
    "uds": "uvicorn listens on this unix socket instead (serve.cli)",
    "api_key": "accepted keys (serve.auth.KeyRing); placeholders are refused",
    "lora_modules": "start-up adapters (adapters.discovery)",
    "chat_template": "replaces the tokenizer's template for every chat request (serve.engine)",
    "default_chat_template_kwargs": "merged under each request's chat_template_kwargs (chat endpoint)",
    "enable_auto_tool_choice": "tool_choice 'auto' is always available here (the stack default)",
    "tool_call_parser": "parses tool calls from answers (serve.openai.chat.tools)",
    "tool_parser_plugin": "imported at start-up so --tool-call-parser can name its parser",
    "enable_prompt_tokens_details": "usage.prompt_tokens_details.cached_tokens (pipeline)",
    "uvicorn_log_level": "uvicorn's log level (serve.cli)",
    "disable_uvicorn_access_log": "uvicorn's access log off (serve.cli)",
    "allow_credentials": "CORS (serve.app)",
    "allowed_origins": "CORS (serve.app)",
    "allowed_methods": "CORS (serve.app)",
    "allowed_headers": "CORS (serve.app)",
    "ssl_keyfile": "uvicorn TLS (serve.cli)",
    "ssl_certfile": "uvicorn TLS (serve.cli)",
    "ssl_ca_certs": "uvicorn TLS (serve.cli)",
    "ssl_cert_reqs": "uvicorn TLS (serve.cli)",
    "ssl_ciphers": "uvicorn TLS (serve.cli)",
    "root_path": "FastAPI's root_path behind a path-routing proxy (serve.app)",
    "h11_max_incomplete_event_size": "uvicorn's h11 limit (serve.cli)",
    "h11_max_header_count": "uvicorn's h11 limit (serve.cli)",
    "response_role": "the role of chat answers (chat endpoint)",
    "fingerprint_mode": "system_fingerprint of chat and completion answers (serve.frontend)",
    "fingerprint_value": "system_fingerprint of chat and completion answers (serve.frontend)",
    "max_log_len": "request logging with vLLM's RequestLogger (serve.openai.request_log)",
    "enable_log_outputs": "request logging with vLLM's RequestLogger (serve.openai.request_log)",
    "enable_log_deltas": "request logging with vLLM's RequestLogger (serve.openai.request_log)",
    "sse_keep_alive_interval": "an SSE comment on idle chat/completion streams (pipeline.with_keep_alive)",
    "middleware": "imported and added to the app as vLLM's server adds it (serve.app)",
    "disable_access_log_for_endpoints": "a filter on uvicorn's access log (serve.cli)",
    "log_error_stack": "error responses are logged with their stack trace (serve.errors)",
    "enable_server_load_tracking": "GET /load answers {server_load: API requests in flight} (serve.app)",
    "enable_tokenizer_info_endpoint": "GET /tokenizer_info, vLLM's shape (serve.app)",
    "enable_request_id_headers": "X-Request-Id on API responses, the client's if it sent one (middleware)",
    "enable_force_include_usage": "every stream ends with a usage chunk (pipeline)",
    "exclude_tools_when_tool_choice_none": 'tool_choice "none" renders no tools (chat tools plan)',
    "disable_fastapi_docs": "no FastAPI docs pages are served here (the flag's effect is the default)",
}

NOT_APPLICABLE: dict[str, str] = {
    "trust_request_mm_kwargs": "multimodal inputs are refused by this text-only server",
    "cohere_is_reasoning_model": "Cohere's /cohere/v2/chat endpoint is not served here",
    "cohere_format": "Cohere's tokenizer mode only",
    "enable_flash_late_interaction": "pooling (scoring) models only; this server generates",
    "data_parallel_supervisor_port": "only with --data-parallel-multi-port-external-lb (refused below)",
    "dp_supervisor_probe_interval_s": "only with --data-parallel-multi-port-external-lb (refused below)",
    "dp_supervisor_probe_timeout_s": "only with --data-parallel-multi-port-external-lb (refused below)",
    "dp_supervisor_probe_failure_threshold": "only with --data-parallel-multi-port-external-lb (refused)",
    "enable_offline_docs": "this server serves no FastAPI docs pages",
}

REFUSED: dict[str, str] = {
    "api_server_count": "one API process per server here (1 is accepted); scale out with data parallelism",
    "grpc": "this server speaks HTTP only",
    "grpc_port": "this server speaks HTTP only",
    "tokens_only": "this server has no Tokens In<>Out-only mode",
    "enable_scale_out": "vLLM's scale-out endpoints are not served here",
    "tool_server": "built-in tools (browser, code interpreter, MCP) are not served here",
    "tool_strict_level": "tool-call grammars here follow tool_choice (auto: parsed, required/named: schema)",
    "chat_template_content_format": "message content is always rendered as a string here (`string` accepted)",
    "trust_request_chat_template": "a request's own chat_template is not accepted here",
    "return_tokens_as_token_ids": "logprob tokens are always their text here",
    "enable_per_request_metrics": "per-request timings are exported as Prometheus histograms instead",
    "anthropic_disabled_thinking_effort": "/v1/messages passes no thinking effort to chat templates here",
    "enable_ssl_refresh": "TLS files are read once at start",
    "data_parallel_multi_port_external_lb": "one API server fronts every data-parallel rank here",
}

# Values of a refused option that this server does honour (its own behaviour is what they ask for).
ACCEPTED_VALUES: dict[str, tuple[Any, ...]] = {
    "api_server_count": (1,),
    "chat_template_content_format": ("string",),
}

# Stack defaults that differ from vLLM's, applied only when the option was not given.
STACK_DEFAULTS: dict[str, tuple[Any, str]] = {
    "tool_call_parser": ("hermes", "tool calls work out of the box (vLLM: none, tools need the flag)"),
}


def front_end_dests() -> dict[str, str]:
    """Every classified front-end option: {dest: 'honoured' | 'not applicable' | 'refused'}."""
    return {
        **dict.fromkeys(HONOURED, "honoured"),
        **dict.fromkeys(NOT_APPLICABLE, "not applicable"),
        **dict.fromkeys(REFUSED, "refused"),
    }


def _long_flag(action: argparse.Action) -> str | None:
    wanted = "--" + action.dest.replace("_", "-")
    if wanted in action.option_strings:
        return wanted
    return next((o for o in action.option_strings if o.startswith("--")), None)


def env_arguments(parser: argparse.ArgumentParser, skip: Iterable[str]) -> list[str]:
    """`LLMSTACK_<DEST>` environment variables for vLLM's options as command-line arguments (placed before
    the real ones, so a flag given on the command line wins). Booleans take true/false; options taking
    several values take a JSON list or whitespace-separated values.

    Hand-written: vLLM's parser reads no environment, and pydantic-settings only covers our own model."""
    skipped = set(skip)
    out: list[str] = []
    for action in parser._actions:
        flag = _long_flag(action)
        if flag is None or action.dest in skipped or action.dest == "help":
            continue
        raw = os.environ.get(ENV_PREFIX + action.dest.upper())
        if raw is None:
            continue
        if action.nargs == 0:  # store_true / BooleanOptionalAction
            truthy = raw.strip().lower() in {"1", "true", "yes", "on"}
            if truthy:
                out.append(flag)
            elif isinstance(action, argparse.BooleanOptionalAction):
                out.append("--no-" + flag.removeprefix("--"))
        elif action.nargs in ("+", "*"):
            values = json.loads(raw) if raw.lstrip().startswith("[") else raw.split()
            out += [flag, *map(str, values)]
        else:
            out += [flag, raw]
    return out


_UNSET = object()


def explicit_dests(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The dests that `argv` (with `--config` expanded) sets: argparse fills in a default only for an
    attribute the namespace does not have yet, so a namespace preset to a sentinel shows what was given."""
    accumulating = (argparse._AppendAction, argparse._AppendConstAction, argparse._CountAction)
    # actions that add to what is there (append, extend, count) start from None, which they accept
    marks = {a.dest: None if isinstance(a, accumulating) else _UNSET for a in parser._actions}
    marks.pop("help", None)
    parsed = parser.parse_args(argv, argparse.Namespace(**marks))
    return {k for k, v in vars(parsed).items() if k in marks and v is not marks[k]}


def _defaults(parser: argparse.ArgumentParser) -> dict[str, Any]:
    return {a.dest: a.default for a in parser._actions if a.dest != "help"}


def resolve(parser: argparse.ArgumentParser, vllm: argparse.Namespace, explicit: set[str]) -> None:
    """Check and complete vLLM's parsed arguments in place: refuse what this server cannot honour (all
    problems in one ConfigError), the positional model, the stack defaults of options not given."""
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args

    defaults = _defaults(parser)
    problems = [
        f"--{dest.replace('_', '-')} is not supported by this server ({why})"
        for dest, why in REFUSED.items()
        if dest in explicit
        and getattr(vllm, dest, None) != defaults.get(dest)
        and getattr(vllm, dest, None) not in ACCEPTED_VALUES.get(dest, ())
    ]
    keys = list(vllm.api_key or [])
    problems += [
        f"API key #{i + 1}: {reason}" for i, key in enumerate(keys) if (reason := placeholder_reason(key))
    ]
    if problems:
        raise ConfigError("; ".join(problems))
    if vllm.model_tag is not None:
        if "model" in explicit and vllm.model != vllm.model_tag:
            raise ConfigError(f"two models given: {vllm.model_tag!r} (positional) and --model {vllm.model!r}")
        vllm.model = vllm.model_tag
    elif "model" not in explicit:
        vllm.model = None  # the embedded default model (vLLM's own default would need the hub)
    for dest, (value, _why) in STACK_DEFAULTS.items():
        if dest not in explicit:
            setattr(vllm, dest, value)
    try:
        validate_parsed_serve_args(vllm)
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err).removeprefix("Error: ")) from None


def system_fingerprint(args: argparse.Namespace, vllm_config: Any) -> str | None:
    """OpenAI's `system_fingerprint` as vLLM's server builds it (`--fingerprint-mode` full, hash, custom
    or none); None without an engine configuration (e.g. a fake engine in tests) or in mode none."""
    from vllm.entrypoints.serve.utils.fingerprint import build_system_fingerprint

    mode = getattr(args, "fingerprint_mode", "full")
    if vllm_config is None and mode != "custom":
        return None
    return build_system_fingerprint(vllm_config, mode, getattr(args, "fingerprint_value", None))  # type: ignore[arg-type]
