"""HTTP route of POST /v1/completions."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from serve.openai.body import authorized_body
from serve.openai.completions.protocol import CompletionRequest
from serve.openai.completions.serving import create_completion

router = APIRouter()


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    body = await authorized_body(request, CompletionRequest)
    request.state.model = body.model
    return await create_completion(request.app.state.server, body, request)
