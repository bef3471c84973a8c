"""Adapter management logic: registry errors become OpenAI errors (400 invalid adapter, 404 unknown name,
409 name taken); everything else is the registry's (adapters.registry). Who may call it is serve/auth.py's
(the admin role)."""

from __future__ import annotations

from pathlib import Path

from adapters.base import BaseModelProfile
from adapters.discovery import AdapterSpec
from adapters.errors import AdapterError, AdapterExists, AdapterNotFound
from adapters.registry import AdapterRegistry, LoRAEngine
from adapters.routing import ModelRouter
from core.errors import StackError
from serve.errors import OpenAIError
from serve.openai.adapters.protocol import AdapterCard, AdapterList, LoadAdapterRequest
from serve.settings import ServeSettings
from serve.state import ServerState


async def start_router(
    settings: ServeSettings,
    model_dir: Path,
    engine: LoRAEngine,
    static: ModelRouter,
    specs: list[AdapterSpec],
) -> ModelRouter:
    """With LoRA enabled: a registry holding the validated start-up adapters; otherwise `static`."""
    if not settings.lora_enabled():
        return static
    profile = BaseModelProfile.from_dir(model_dir, static.base_name)
    registry = AdapterRegistry(
        profile,
        engine,
        max_lora_rank=settings.vllm.max_lora_rank,
        unload_timeout=settings.adapter_unload_timeout_seconds,
        served_aliases=getattr(static, "aliases", ()),
    )
    await registry.load_all(specs)
    return registry


def registry_of(state: ServerState) -> AdapterRegistry:
    if not isinstance(state.router, AdapterRegistry) or not state.settings.lora_enabled():
        raise OpenAIError(400, "LoRA adapters are not enabled on this server (start it with --enable-lora)")
    return state.router


def _as_openai(err: StackError, name: str) -> OpenAIError:
    if isinstance(err, AdapterNotFound):
        return OpenAIError(404, str(err), param="name", code="adapter_not_found")
    if isinstance(err, AdapterExists):
        return OpenAIError(409, str(err), param="name", code="adapter_exists")
    if isinstance(err, AdapterError):
        return OpenAIError(400, str(err), param="path", code="invalid_adapter")
    return OpenAIError(400, f"adapter {name!r}: {err}")


async def load_adapter(state: ServerState, req: LoadAdapterRequest) -> AdapterCard:
    registry = registry_of(state)
    try:
        entry = await registry.load(req.name, Path(req.path))
    except StackError as err:
        raise _as_openai(err, req.name) from None
    return AdapterCard.of(entry, registry.base_name)


async def unload_adapter(state: ServerState, name: str) -> AdapterCard:
    registry = registry_of(state)
    try:
        entry = await registry.unload(name)
    except StackError as err:
        raise _as_openai(err, name) from None
    return AdapterCard.of(entry, registry.base_name)


def list_adapters(state: ServerState) -> AdapterList:
    registry = registry_of(state)
    return AdapterList(data=[AdapterCard.of(e, registry.base_name) for e in registry.adapters()])
