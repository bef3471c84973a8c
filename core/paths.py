"""Where the stack keeps caches. One environment variable moves everything: `LLMSTACK_CACHE_DIR`."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache root (created on demand): `$LLMSTACK_CACHE_DIR`, else `~/.cache/llmstack`."""
    root = os.environ.get("LLMSTACK_CACHE_DIR")
    path = Path(root) if root else Path.home() / ".cache" / "llmstack"
    path.mkdir(parents=True, exist_ok=True)
    return path
