"""An HTTP middleware for the e2e test of vLLM's `--middleware` option (imported by the server by path)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response


async def mark_responses(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    """Adds `x-test-middleware: seen` to every response."""
    response = await call_next(request)
    response.headers["x-test-middleware"] = "seen"
    return response
