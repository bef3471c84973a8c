"""OpenAI-shaped errors: every error the server returns is `{"error": {"message", "type", "param", "code"}}`
(except on Anthropic's Messages API routes, which reshape the same errors: serve/anthropic/errors.py).

Invariant: no handler ever answers FastAPI's default `{"detail": ...}`; exception handlers registered by
`install_error_handlers` cover our own errors, request validation, routing (404/405) and anything unexpected.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters.routing import ModelNotFound
from core.config import describe_problems
from core.errors import StackError
from serve.engine.supervisor import EngineState, EngineUnavailable

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    503: "service_unavailable",
}


class OpenAIError(Exception):
    """An error with its HTTP status and OpenAI error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, param=self.param, code=self.code)


def error_body(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    err_type = _TYPES.get(status, "invalid_request_error" if status < 500 else "internal_error")
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


def sse_error_frame(err: OpenAIError) -> str:
    """The frame sent when a stream fails after its 200 was sent (followed by `data: [DONE]`)."""
    return f"data: {json.dumps(err.body())}\n\n"


# Sent with 503 engine_dead: the engine died under the request; a new one starts in this process (or, once
# restarts are exhausted, the process exits and its supervisor restarts it), which takes seconds to tens of
# seconds.
ENGINE_DEAD_RETRY_AFTER_SECONDS = 10


def engine_dead_error(detail: str = "the inference engine died") -> OpenAIError:
    """503 `engine_dead`: the engine died under this request (retryable: a new engine is on its way)."""
    return OpenAIError(
        503,
        f"{detail}; the engine is being restarted, retry later",
        code="engine_dead",
        headers={"Retry-After": str(ENGINE_DEAD_RETRY_AFTER_SECONDS)},
    )


def engine_unavailable_error(exc: EngineUnavailable) -> OpenAIError:
    """503 `engine_restarting` while a new engine starts, `engine_dead` once none will; with Retry-After."""
    code = "engine_dead" if exc.state is EngineState.FAILED else "engine_restarting"
    return OpenAIError(503, str(exc), code=code, headers={"Retry-After": str(exc.retry_after)})


def is_engine_dead(exc: BaseException) -> bool:
    """True for vLLM's `EngineDeadError` (looked up only if vLLM is loaded: this module never imports it)."""
    module = sys.modules.get("vllm.v1.engine.exceptions")
    return module is not None and isinstance(exc, module.EngineDeadError)


def as_openai_error(exc: BaseException) -> OpenAIError:
    """Our own errors keep their status; user errors from `core` are 400; a dead or restarting engine is 503
    `engine_dead`/`engine_restarting` (with Retry-After); anything else is a 500."""
    if isinstance(exc, OpenAIError):
        return exc
    if is_engine_dead(exc):
        return engine_dead_error()
    if isinstance(exc, EngineUnavailable):
        return engine_unavailable_error(exc)
    if isinstance(exc, ModelNotFound):
        return OpenAIError(404, str(exc), param="model", code="model_not_found")
    if isinstance(exc, StackError):
        return OpenAIError(400, str(exc))
    log.exception("unexpected error", exc_info=exc)
    return OpenAIError(500, f"internal error: {type(exc).__name__}")


def error_response(err: OpenAIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _validation_param(loc: Any) -> str | None:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or None


def install_error_handlers(app: FastAPI, log_stack: bool = False) -> None:
    """Make every error response OpenAI-shaped; `log_stack` (vLLM's `--log-error-stack`): log each error
    response's exception with its stack trace."""

    async def on_openai_error(_: Request, exc: Exception) -> JSONResponse:
        if log_stack:
            log.error("error response: %s", exc, exc_info=exc)
        return error_response(as_openai_error(exc))

    async def on_validation(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        message = (
            describe_problems(errors, top_level="body", limit=5, skip_loc=("body",)) or "invalid request"
        )
        return error_response(OpenAIError(400, message, param=_validation_param(first["loc"])))

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        headers = dict(exc.headers or {})
        err = OpenAIError(exc.status_code, str(exc.detail), headers=headers)
        from serve.anthropic.errors import (
            anthropic_error_response,
            is_anthropic_path,
        )  # (imports this module)

        if is_anthropic_path(request.url.path):  # e.g. GET /v1/messages: 405 in the Messages API's shape
            return anthropic_error_response(err)
        return error_response(err)

    app.add_exception_handler(OpenAIError, on_openai_error)
    app.add_exception_handler(StackError, on_openai_error)
    app.add_exception_handler(EngineUnavailable, on_openai_error)  # expected while restarting: no traceback
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_openai_error)
