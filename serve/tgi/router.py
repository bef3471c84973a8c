"""HTTP routes of TGI's API: POST /generate, POST /generate_stream, POST / (streams or not, by the body's
`stream`; huggingface_hub's InferenceClient posts here), GET /info. Same auth as the OpenAI routes."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from serve.auth import authorize
from serve.errors import OpenAIError, as_openai_error
from serve.openai.body import authorized_body
from serve.openai.pipeline import json_response
from serve.openai.version.router import versions
from serve.state import ServerState
from serve.tgi.protocol import MAX_STOP_SEQUENCES, GenerateRequest
from serve.tgi.serving import DEFAULT_MAX_NEW_TOKENS, generate, tgi_error

router = APIRouter()


async def _generate(request: Request, *, stream: bool | None, as_list: bool = False) -> Response:
    try:
        body = await authorized_body(request, GenerateRequest)
        request.state.model = body.parameters.adapter_id or request.app.state.server.router.base_name
        wants_stream = body.stream if stream is None else stream
        return await generate(request.app.state.server, body, request, stream=wants_stream, as_list=as_list)
    except Exception as exc:  # every error in TGI's shape, ours (400, 404, 429) and unexpected ones (500)
        return tgi_error(as_openai_error(exc))


@router.post("/generate")
async def tgi_generate(request: Request) -> Response:
    """The whole answer: `{"generated_text", "details"}`."""
    return await _generate(request, stream=False)


@router.post("/generate_stream")
async def tgi_generate_stream(request: Request) -> Response:
    """One server-sent event per generated token; the last carries `generated_text` and `details`."""
    return await _generate(request, stream=True)


@router.post("/")
async def tgi_compat(request: Request) -> Response:
    """TGI's compatibility route: streams if the body says `stream: true`, else a one-item list."""
    return await _generate(request, stream=None, as_list=True)


@router.get("/info")
async def tgi_info(request: Request) -> Response:
    """TGI's server description, filled in from this server's engine and limits."""
    try:
        authorize(request)
    except OpenAIError as err:
        return tgi_error(err)
    state: ServerState = request.app.state.server
    max_len = state.engine.max_model_len
    return json_response(
        {
            "model_id": state.router.base_name,
            "model_sha": None,
            "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": state.settings.max_concurrent_requests,
            "max_best_of": 1,
            "max_stop_sequences": MAX_STOP_SEQUENCES,
            "max_input_tokens": max_len - 1,
            "max_total_tokens": max_len,
            "max_new_tokens_default": DEFAULT_MAX_NEW_TOKENS,
            "validation_workers": 1,
            "max_client_batch_size": 1,
            "router": "llmstack-serve",
            "version": versions()["llmstack"],
            "sha": None,
            "docker_label": None,
        }
    )
