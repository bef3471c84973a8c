"""HTTP route of POST /v1/chat/completions."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from serve.openai.body import authorized_body
from serve.openai.chat.protocol import ChatCompletionRequest
from serve.openai.chat.serving import create_chat_completion

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    body = await authorized_body(request, ChatCompletionRequest)
    request.state.model = body.model
    return await create_chat_completion(request.app.state.server, body, request)
