"""`build_app(settings, engine)`: the FastAPI application of the server.

Invariant: the app owns no engine life cycle (the CLI starts and stops the engine); everything a handler needs
is in `app.state.server` (a `ServerState`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse

from adapters.routing import BaseModelRouter, ModelRouter
from serve import metrics
from serve.anthropic.messages.router import router as anthropic_messages_router
from serve.engine.protocol import Engine
from serve.engine.supervisor import EngineState, EngineSupervisor, EngineUnavailable
from serve.errors import (
    OpenAIError,
    as_openai_error,
    engine_dead_error,
    error_response,
    install_error_handlers,
)
from serve.middleware import APIMiddleware
from serve.openai.adapters.router import router as adapters_router
from serve.openai.chat.reasoning import check_parser_fits, check_reasoning_parser
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


def add_user_middleware(app: FastAPI, paths: list[str]) -> None:
    """vLLM's `--middleware`: each import path names an ASGI middleware class (added with
    `add_middleware`) or an async function (an HTTP middleware), as vLLM's server adds them."""
    import importlib
    import inspect

    from core.errors import ConfigError

    for path in paths:
        module_path, _, name = path.rpartition(".")
        try:
            imported = getattr(importlib.import_module(module_path), name)
        except (ImportError, AttributeError, ValueError) as err:
            raise ConfigError(f"--middleware {path!r} cannot be imported: {err}") from None
        if inspect.isclass(imported):
            app.add_middleware(imported)  # type: ignore[arg-type]
        elif inspect.iscoroutinefunction(imported):
            app.middleware("http")(imported)
        else:
            raise ConfigError(f"--middleware {path!r} is neither a class nor an async function")


def build_app(settings: ServeSettings, engine: Engine, router: ModelRouter | None = None) -> FastAPI:
    """The API on `engine`; `router` defaults to the base model alone."""
    check_tool_parser(settings.tool_call_parser, settings.vllm.tool_parser_plugin)
    check_reasoning_parser(settings.vllm.reasoning_parser, settings.vllm.reasoning_parser_plugin)
    check_parser_fits(settings.vllm.reasoning_parser, engine.tokenizer)
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
    install_error_handlers(app, log_stack=bool(getattr(args, "log_error_stack", False)))
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
    app.include_router(anthropic_messages_router)

    supervisor = engine if isinstance(engine, EngineSupervisor) else None

    async def engine_problem() -> OpenAIError | None:
        """None while the engine runs. A restarting engine is 503 `engine_restarting`; a dead one 503
        `engine_dead`, and for good (`state.engine_dead`) unless a supervisor is replacing it."""
        if supervisor is not None:
            await supervisor.watch()  # a death the watchdog has not seen yet starts its replacement now
        try:
            await state.engine.check_health()
        except EngineUnavailable as exc:
            state.engine_dead = exc.state is EngineState.FAILED
            return as_openai_error(exc)
        except Exception as exc:
            state.engine_dead = supervisor is None
            return engine_dead_error(f"engine is not healthy: {exc}")
        return None

    def probe_response(problem: OpenAIError | None) -> Response:
        """The probe's answer; with a supervisor the body also holds the engine's state."""
        body: dict[str, Any] = problem.body() if problem else {"status": "ok"}
        if supervisor is None:
            return error_response(problem) if problem else Response(status_code=200)
        body["engine"] = supervisor.status()
        if problem is None:
            return JSONResponse(body)
        return JSONResponse(body, status_code=problem.status, headers=problem.headers)

    @app.get("/health")
    async def health() -> Response:
        """Liveness: 200 while the engine is alive or being replaced (also while draining); 503 once dead
        for good."""
        problem = await engine_problem()
        if problem is not None and problem.code == "engine_restarting":
            problem = None  # the process is alive and healing itself
        return probe_response(problem)

    @app.get("/ready")
    async def ready() -> Response:
        """Readiness: 200 only while the engine runs and the server is not draining."""
        problem = await engine_problem()
        if problem is None and state.draining:
            problem = OpenAIError(503, "server is shutting down", code="draining")
        return probe_response(problem)

    add_user_middleware(app, list(getattr(args, "middleware", None) or []))
    if getattr(args, "enable_server_load_tracking", False):

        @app.get("/load")
        async def load() -> Response:
            """vLLM's server load: API requests in flight."""
            return JSONResponse({"server_load": state.in_flight})

    if getattr(args, "enable_tokenizer_info_endpoint", False):

        @app.get("/tokenizer_info")
        async def tokenizer_info() -> Response:
            """vLLM's tokenizer information (its configuration and chat template)."""
            from vllm.entrypoints.serve.tokenize.serving import TokenizerInfo

            tokenizer = state.engine.tokenizer
            info = TokenizerInfo(tokenizer, getattr(tokenizer, "chat_template", None)).to_dict()  # type: ignore[arg-type]
            return JSONResponse(jsonable_encoder(info))

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        usage = state.engine.kv_cache_usage()
        if usage is not None:
            metrics.KV_CACHE_USAGE.set(usage)
        metrics.LORA_ADAPTERS_LOADED.set(sum(1 for m in state.router.models() if m.parent is not None))
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    return app
