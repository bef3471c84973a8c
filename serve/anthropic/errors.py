"""Anthropic-shaped errors for the Messages API routes: `{"type": "error", "error": {"type", "message"}}`.

Invariant: every error a `/v1/messages*` route answers (our own `OpenAIError`s, validation, admission,
the middleware's 413/503, unexpected failures) is shaped here from the same `OpenAIError`, with its HTTP
status and headers kept; the other routes keep OpenAI's shape.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import Response

from serve.errors import OpenAIError, as_openai_error
from serve.openai.pipeline import JSON, json_response

PATH_PREFIX = "/v1/messages"

# Anthropic's error types by HTTP status (https://docs.anthropic.com/en/api/errors).
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def is_anthropic_path(path: str) -> bool:
    return path == PATH_PREFIX or path.startswith(PATH_PREFIX + "/")


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")


def anthropic_error_body(err: OpenAIError) -> dict[str, Any]:
    """`err` as Anthropic's error object (the message names the parameter where OpenAI's `param` would)."""
    message = err.message
    if err.param and err.param not in message:
        message = f"{err.param}: {message}"
    return {"type": "error", "error": {"type": error_type(err.status), "message": message}}


def anthropic_error_response(exc: BaseException) -> Response:
    """Any exception as Anthropic's error response (status and headers of its `OpenAIError`)."""
    err = as_openai_error(exc)
    response = json_response(anthropic_error_body(err), status=err.status)
    response.headers.update(err.headers)
    return response


def anthropic_error_event(exc: BaseException) -> bytes:
    """The `error` event of a stream that fails after its 200."""
    return b"event: error\ndata: " + JSON.encode(anthropic_error_body(as_openai_error(exc))) + b"\n\n"
