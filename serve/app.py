"""`build_app(settings, engine)`: the FastAPI application of the server.

Invariant: the app owns no engine life cycle (the CLI starts and stops the engine); everything a handler needs
is in `app.state.server` (a `ServerState`).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware

from adapters.routing import BaseModelRouter, ModelRouter
from serve import metrics
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


def default_router(settings: ServeSettings, model_dir: Path) -> BaseModelRouter:
    """The base model under `--served-model-name`'s names (default: its folder's name)."""
    name, *aliases = settings.served_model_names(model_dir)
    return BaseModelRouter(name, str(model_dir), aliases=tuple(aliases))


def build_app(settings: ServeSettings, engine: Engine, router: ModelRouter | None = None) -> FastAPI:
    """The API on `engine`; `router` defaults to the base model alone."""
    check_tool_parser(settings.tool_call_parser, settings.vllm.tool_parser_plugin)
    router = router or default_router(settings, Path(settings.model or "model"))
    state = ServerState.create(settings, engine, router)
    args = settings.vllm
    app = FastAPI(
        title="llmstack serve",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        root_path=getattr(args, "root_path", None) or "",
    )
    app.state.server = state
    install_error_handlers(app)
    app.add_middleware(APIMiddleware, state=state)
    if getattr(args, "allowed_origins", None):  # vLLM's CORS options, as its own server applies them
        app.add_middleware(
            CORSMiddleware,
            allow_origins=args.allowed_origins,
            allow_credentials=args.allow_credentials,
            allow_methods=args.allowed_methods,
            allow_headers=args.allowed_headers,
        )
    app.include_router(chat_router)
    app.include_router(completions_router)
    app.include_router(models_router)
    app.include_router(adapters_router)
    app.include_router(tokenize_router)
    app.include_router(version_router)
    app.include_router(tgi_router)

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
