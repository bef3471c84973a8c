"""ASGI middleware of the API: body size limit, draining, in-flight accounting, HTTP metrics.

Invariants: a body over the limit is refused with 413 before a handler sees it; while draining, every
request except /health, /ready and /metrics gets 503 (`draining`), and so does every such request once the
engine has died (`engine_dead`, with Retry-After); `in_flight` drops only when a response (stream
included) is over, and the callbacks a handler put on `request.state.cleanup` run then, whatever happened.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve import metrics
from serve.anthropic.errors import anthropic_error_body, is_anthropic_path
from serve.errors import OpenAIError, engine_dead_error
from serve.state import ServerState

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"})


async def _send_error(send: Send, err: OpenAIError, path: str) -> None:
    """`err` in the shape of the API `path` belongs to (Anthropic's on the Messages routes)."""
    body = json.dumps(anthropic_error_body(err) if is_anthropic_path(path) else err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class APIMiddleware:
    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    @staticmethod
    def _request_id(scope: Scope) -> bytes:
        """vLLM's `--enable-request-id-headers`: the client's X-Request-Id, else a new one."""
        given = dict(scope.get("headers") or ()).get(b"x-request-id")
        return given if given else uuid.uuid4().hex.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if path in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        status = {"code": 500, "started": False}
        cleanup: list[Callable[[], None]] = []
        scope.setdefault("state", {})["cleanup"] = cleanup
        scope["state"]["model"] = ""

        request_id = self._request_id(scope) if self.state.request_id_headers else None

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                status["started"] = True
                if request_id is not None:
                    message["headers"] = [*message.get("headers", ()), (b"x-request-id", request_id)]
            await send(message)

        limit = self.state.settings.max_request_body_bytes

        self.state.in_flight += 1
        try:
            if self.state.engine_dead:
                await _send_error(send_wrapper, engine_dead_error(), path)
                return
            if self.state.draining:
                await _send_error(
                    send_wrapper, OpenAIError(503, "server is shutting down", code="draining"), path
                )
                return
            declared = _content_length(scope)
            if declared is not None and declared > limit:
                await _send_error(send_wrapper, _too_large(limit), path)
                return
            if declared is None:  # chunked: read it all (up to the limit) before the app sees it
                body = await _read_body(receive, limit)
                if body is None:
                    await _send_error(send_wrapper, _too_large(limit), path)
                    return
                receive = _replay(body, receive)
            await self.app(scope, receive, send_wrapper)
        finally:
            self.state.in_flight -= 1
            for callback in cleanup:
                callback()
            endpoint = _endpoint(scope)
            # The handler sets `model_label` once the model resolved; an unresolved model is "unknown".
            label = scope["state"].get("model_label") or ("unknown" if scope["state"].get("model") else "")
            metrics.HTTP_REQUESTS.labels(endpoint, label, str(status["code"])).inc()


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body, or None as soon as it exceeds `limit` bytes."""
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        parts.append(message.get("body", b""))
        size += len(parts[-1])
        if size > limit:
            return None
        if not message.get("more_body", False):
            break
    return b"".join(parts)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that yields `body` once, then defers to the real one (for disconnects)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _too_large(limit: int) -> OpenAIError:
    return OpenAIError(413, f"request body is larger than {limit} bytes", code="request_too_large")


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", []):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _endpoint(scope: Scope) -> str:
    """The matched route's path template (bounded), or `unmatched`."""
    route: Any = scope.get("route")
    return str(getattr(route, "path", None) or "unmatched")
