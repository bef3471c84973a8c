"""vLLM's environment on this project's machines (DESIGN.md), kept in one place for `serve`, the benchmarks
and the tests.

Invariant: a default never overrides a value the user set; importing this module imports nothing heavy, so
it can run before vLLM or transformers are imported.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

# Without a KV cache size vLLM on CPU takes ~92% of the RAM and can fail to start; usage stats stay local.
CPU_ENV_DEFAULTS: dict[str, str] = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_NO_USAGE_STATS": "1",
}
# No model hub at run time, ever; tokenizers' own threads fight vLLM's for the two cores.
OFFLINE_ENV_DEFAULTS: dict[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def with_defaults(environ: MutableMapping[str, str] | None = None, *, offline: bool = True) -> dict[str, str]:
    """The defaults that `environ` (default: this process's environment) does not set yet."""
    environ = os.environ if environ is None else environ
    defaults = {**CPU_ENV_DEFAULTS, **(OFFLINE_ENV_DEFAULTS if offline else {})}
    return {key: value for key, value in defaults.items() if key not in environ}


def apply_defaults(environ: MutableMapping[str, str] | None = None, *, offline: bool = True) -> None:
    """Set every default that `environ` (default: `os.environ`) does not set yet."""
    environ = os.environ if environ is None else environ
    environ.update(with_defaults(environ, offline=offline))
