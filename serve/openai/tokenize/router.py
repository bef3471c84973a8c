"""HTTP routes of POST /tokenize and POST /detokenize (vLLM's paths, no /v1 prefix, as vLLM serves them)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from serve.openai.body import authorized_body
from serve.openai.tokenize.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from serve.openai.tokenize.serving import detokenize, tokenize

router = APIRouter()


@router.post("/tokenize")
async def post_tokenize(request: Request) -> TokenizeResponse:
    """A prompt (`prompt`) or a conversation (`messages`) as token ids."""
    return tokenize(request.app.state.server, await authorized_body(request, TokenizeRequest))


@router.post("/detokenize")
async def post_detokenize(request: Request) -> DetokenizeResponse:
    """Token ids back to text."""
    return detokenize(request.app.state.server, await authorized_body(request, DetokenizeRequest))
