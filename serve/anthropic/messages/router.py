"""HTTP routes of Anthropic's Messages API: POST /v1/messages, POST /v1/messages/count_tokens.

Same keys as the OpenAI routes, sent as `x-api-key` (Anthropic's header) or as a bearer key;
`anthropic-version` and `anthropic-beta` headers are accepted and not needed. Every error is Anthropic's
shape (serve/anthropic/errors.py).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from serve.anthropic.errors import anthropic_error_response
from serve.anthropic.messages.protocol import CountTokensRequest, MessagesRequest
from serve.anthropic.messages.serving import count_tokens, create_message
from serve.auth import authorize
from serve.openai.body import parse_body
from serve.openai.pipeline import json_response

router = APIRouter()


@router.post("/v1/messages")
async def messages(request: Request) -> Response:
    try:
        authorize(request, x_api_key=True)
        body = await parse_body(request, MessagesRequest)
        request.state.model = body.model
        return await create_message(request.app.state.server, body, request)
    except Exception as exc:  # ours (400, 401, 404, 429, 503) and unexpected ones (500), in Anthropic's shape
        return anthropic_error_response(exc)


@router.post("/v1/messages/count_tokens")
async def messages_count_tokens(request: Request) -> Response:
    try:
        authorize(request, x_api_key=True)
        body = await parse_body(request, CountTokensRequest)
        request.state.model = body.model
        return json_response(await count_tokens(request.app.state.server, body))
    except Exception as exc:
        return anthropic_error_response(exc)
