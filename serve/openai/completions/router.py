"""HTTP route of POST /v1/completions."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from serve.auth import key_id_of
from serve.openai.completions.protocol import CompletionRequest
from serve.openai.completions.serving import create_completion

router = APIRouter(dependencies=[Depends(key_id_of)])


@router.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
    request.state.model = body.model
    return await create_completion(request.app.state.server, body, request.state.cleanup)
