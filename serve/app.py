"""`build_app(settings, engine)`: the FastAPI application of the server.

Invariant: the app owns no engine life cycle (the CLI starts and stops the engine); everything a handler needs
is in `app.state.server` (a `ServerState`).
"""

from __future__ import annotations

from fastapi import FastAPI, Request, Response

from adapters.routing import BaseModelRouter, ModelRouter
from serve import metrics
from serve.anthropic.messages.router import router as anthropic_messages_router
from serve.engine.protocol import Engine
from serve.errors import OpenAIError, engine_dead_error, error_response, install_error_handlers
from serve.middleware import APIMiddleware
from serve.openai.adapters.router import router as adapters_router
from serve.openai.chat.router import router as chat_router
from serve.openai.chat.tools import check_tool_parser
from serve.openai.completions.router import router as completions_router
from serve.openai.models.router import router as models_router
from serve.openai.tokenize.router import router as tokenize_router
from serve.openai.version.router import router as version_router
from serve.settings import ServeSettings
from serve.state import ServerState
from serve.tgi.router import router as tgi_router


def default_router(settings: ServeSettings, base_root: str) -> BaseModelRouter:
    """The base model under `--served-model-name` (default: its folder's name)."""
    from pathlib import Path

    return BaseModelRouter(settings.served_model_name or Path(base_root).name, base_root)


def build_app(settings: ServeSettings, engine: Engine, router: ModelRouter | None = None) -> FastAPI:
    """The API on `engine`; `router` defaults to the base model alone."""
    check_tool_parser(settings.tool_call_parser)
    router = router or default_router(settings, settings.model or "model")
    state = ServerState.create(settings, engine, router)
    app = FastAPI(title="llmstack serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    install_error_handlers(app)
    app.add_middleware(APIMiddleware, state=state)
    app.include_router(chat_router)
    app.include_router(completions_router)
    app.include_router(models_router)
    app.include_router(adapters_router)
    app.include_router(tokenize_router)
    app.include_router(version_router)
    app.include_router(tgi_router)
    app.include_router(anthropic_messages_router)

    async def engine_problem() -> OpenAIError | None:
        """None while the engine is alive; once it is dead (for good), the 503 and `state.engine_dead`."""
        try:
            await state.engine.check_health()
        except Exception as exc:
            state.engine_dead = True
            return engine_dead_error(f"engine is not healthy: {exc}")
        return None

    @app.get("/health")
    async def health() -> Response:
        """Liveness: 200 while the engine is alive (also while draining)."""
        problem = await engine_problem()
        return error_response(problem) if problem else Response(status_code=200)

    @app.get("/ready")
    async def ready() -> Response:
        """Readiness: 200 only while the engine is alive and the server is not draining."""
        if problem := await engine_problem():
            return error_response(problem)
        if state.draining:
            return error_response(OpenAIError(503, "server is shutting down", code="draining"))
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        usage = state.engine.kv_cache_usage()
        if usage is not None:
            metrics.KV_CACHE_USAGE.set(usage)
        metrics.LORA_ADAPTERS_LOADED.set(sum(1 for m in state.router.models() if m.parent is not None))
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    return app
