"""HTTP routes of the adapter management API (admin key required when API keys are set)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from serve.openai.adapters.protocol import AdapterCard, AdapterList, LoadAdapterRequest
from serve.openai.adapters.serving import check_admin, list_adapters, load_adapter, unload_adapter
from serve.state import ServerState


def _admin(request: Request) -> None:
    check_admin(request.app.state.server, request.headers.get("authorization"))


router = APIRouter(dependencies=[Depends(_admin)])


@router.post("/v1/adapters")
async def post_adapter(request: Request, body: LoadAdapterRequest) -> AdapterCard:
    """Load an adapter from a folder on the server and serve it under `name`."""
    state: ServerState = request.app.state.server
    return await load_adapter(state, body)


@router.delete("/v1/adapters/{name}")
async def delete_adapter(request: Request, name: str) -> AdapterCard:
    """Stop routing to `name`, let its in-flight requests finish, then unload it."""
    state: ServerState = request.app.state.server
    return await unload_adapter(state, name)


@router.get("/v1/adapters")
async def get_adapters(request: Request) -> AdapterList:
    """Every loaded adapter with its path, rank, base, load time and request count."""
    return list_adapters(request.app.state.server)
