"""HTTP routes of the adapter management API (the admin role: serve/auth.py), in this server's REST shape
(`/v1/adapters`) and in vLLM's (`/v1/load_lora_adapter`, `/v1/unload_lora_adapter`) for clients written
against vLLM. Both shapes run the same registry calls."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from serve.auth import Role, authorize
from serve.openai.adapters.protocol import (
    AdapterCard,
    AdapterList,
    LoadAdapterRequest,
    VllmLoadLoraRequest,
    VllmUnloadLoraRequest,
)
from serve.openai.adapters.serving import list_adapters, load_adapter, unload_adapter
from serve.openai.body import authorized_body

router = APIRouter()


@router.post("/v1/adapters")
async def post_adapter(request: Request) -> AdapterCard:
    """Load an adapter from a folder on the server and serve it under `name`."""
    body = await authorized_body(request, LoadAdapterRequest, Role.ADMIN)
    return await load_adapter(request.app.state.server, body)


@router.delete("/v1/adapters/{name}")
async def delete_adapter(request: Request, name: str) -> AdapterCard:
    """Stop routing to `name`, let its in-flight requests finish, then unload it."""
    authorize(request, Role.ADMIN)
    return await unload_adapter(request.app.state.server, name)


@router.get("/v1/adapters")
async def get_adapters(request: Request) -> AdapterList:
    """Every loaded adapter with its path, rank, base, load time and request count."""
    authorize(request, Role.ADMIN)
    return list_adapters(request.app.state.server)


@router.post("/v1/load_lora_adapter")
async def vllm_load_lora_adapter(request: Request) -> PlainTextResponse:
    """vLLM's shape of `POST /v1/adapters`: `{"lora_name", "lora_path"}`, answered with a success line."""
    body = await authorized_body(request, VllmLoadLoraRequest, Role.ADMIN)
    await load_adapter(request.app.state.server, LoadAdapterRequest(name=body.lora_name, path=body.lora_path))
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter")
async def vllm_unload_lora_adapter(request: Request) -> PlainTextResponse:
    """vLLM's shape of `DELETE /v1/adapters/{name}`: `{"lora_name"}`, answered with a success line."""
    body = await authorized_body(request, VllmUnloadLoraRequest, Role.ADMIN)
    await unload_adapter(request.app.state.server, body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
