"""HTTP route of POST /v1/chat/completions."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from serve.auth import key_id_of
from serve.openai.chat.protocol import ChatCompletionRequest
from serve.openai.chat.serving import create_chat_completion

router = APIRouter(dependencies=[Depends(key_id_of)])


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
    request.state.model = body.model
    return await create_chat_completion(request.app.state.server, body, request.state.cleanup)
