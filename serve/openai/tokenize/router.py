"""HTTP routes of POST /tokenize and POST /detokenize (vLLM's paths, no /v1 prefix, as vLLM serves them)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from serve.auth import authorize
from serve.openai.body import parse_body
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
    authorize(request)
    return tokenize(request.app.state.server, await parse_body(request, TokenizeRequest))


@router.post("/detokenize")
async def post_detokenize(request: Request) -> DetokenizeResponse:
    """Token ids back to text."""
    authorize(request)
    return detokenize(request.app.state.server, await parse_body(request, DetokenizeRequest))
