"""`serve`: start the OpenAI-compatible server (flags: `serve --help`).

Invariants: bad flags or settings exit 2 with one line per problem before anything is loaded; SIGTERM drains
(ready → 503, new requests 503, in-flight requests finish up to `--drain-timeout-seconds`) and exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn
from pydantic import ValidationError
from pydantic_settings import SettingsError
from uvicorn.loops.auto import auto_loop_factory

from core.config import describe_validation_error
from core.errors import StackError
from serve.engine import cpu_env
from serve.engine.supervisor import EngineState, EngineSupervisor, RestartPolicy
from serve.settings import ServeSettings, parse_settings

if TYPE_CHECKING:
    from serve.state import ServerState

log = logging.getLogger("serve")


def apply_env_defaults(settings: ServeSettings) -> None:
    """Set vLLM's environment defaults for this machine unless the user set them."""
    if settings.cpu_kvcache_space_gib is not None:
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(settings.cpu_kvcache_space_gib)
    cpu_env.apply_defaults(offline=False)


# Once the engine is dead: keep answering 503 engine_dead for at least this long (so that a load balancer or
# a client sees /ready fail and a clean 503 rather than a refused connection) and while streams in flight
# still end with their error frame, but never longer than the maximum; then exit with ENGINE_DEAD_EXIT_CODE.
ENGINE_DEAD_MIN_LINGER_SECONDS = 2.0
ENGINE_DEAD_MAX_LINGER_SECONDS = 5.0
ENGINE_DEAD_EXIT_CODE = 1


class EngineDiedError(RuntimeError):
    """The engine died for good while serving; the process exits non-zero so that its supervisor restarts
    it."""


def restart_policy(settings: ServeSettings) -> RestartPolicy:
    """The engine supervisor's policy from the `--engine-*` flags."""
    return RestartPolicy(
        max_failures=settings.engine_restart_max,
        window_seconds=settings.engine_restart_window_seconds,
        backoff_seconds=settings.engine_restart_backoff_seconds,
        hang_timeout_seconds=settings.engine_hang_timeout_seconds,
        wait_seconds=settings.engine_wait_seconds,
    )


class DrainingServer(uvicorn.Server):
    """uvicorn, except that
    - SIGTERM/SIGINT start a drain instead of closing the listening socket at once: the app answers 503 while
      in-flight requests finish, then the server stops (a second signal: at once);
    - a watchdog looks at the engine every tick (0.1 s). A supervised engine (`EngineSupervisor`) replaces
      a dead or hung engine itself; once it is dead for good (a plain engine: dead; a supervisor: gave up),
      `state.engine_dead` makes /ready and new requests answer 503 engine_dead, and the server stops within
      ENGINE_DEAD_MAX_LINGER_SECONDS with `engine_died` set (vLLM's AsyncLLM marks itself dead as soon as its
      engine core process exits)."""

    def __init__(self, config: uvicorn.Config, state: ServerState, drain_timeout: float) -> None:
        super().__init__(config)
        self._state = state
        self._drain_timeout = drain_timeout
        self._drain_started: float | None = None
        self._engine_died_at: float | None = None
        self.engine_failure = ""

    @property
    def engine_died(self) -> bool:
        return self._engine_died_at is not None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_started is None:
            log.info("signal %s: draining (up to %.0f s)", signal.Signals(sig).name, self._drain_timeout)
            self._drain_started = time.monotonic()
            self._state.draining = True
        else:
            self.should_exit = True
            self.force_exit = True

    async def _watch_engine(self) -> None:
        if self._engine_died_at is not None:
            return
        engine = self._state.engine
        if isinstance(engine, EngineSupervisor):  # it replaces a dead or hung engine; exit once it gives up
            await engine.watch()
            if engine.state is not EngineState.FAILED:
                return
            reason = engine.failure or "the engine supervisor gave up"
        else:
            try:
                await engine.check_health()
                if not self._state.engine_dead:
                    return
                reason = "reported by a health check"
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"
        self._engine_died_at = time.monotonic()
        self._state.engine_dead = True
        self.engine_failure = " ".join(reason.split())
        log.error(
            "the engine died (%s): /ready and new requests answer 503 engine_dead; exiting with status %d "
            "within %.0f s so that a supervisor restarts the server",
            reason,
            ENGINE_DEAD_EXIT_CODE,
            ENGINE_DEAD_MAX_LINGER_SECONDS,
        )

    async def on_tick(self, counter: int) -> bool:
        await self._watch_engine()
        in_flight = self._state.in_flight
        if self._engine_died_at is not None:
            dead_for = time.monotonic() - self._engine_died_at
            if dead_for >= ENGINE_DEAD_MAX_LINGER_SECONDS:
                self.force_exit = in_flight > 0  # a stream that has not ended by now is not waited for
                return True
            if dead_for >= ENGINE_DEAD_MIN_LINGER_SECONDS and in_flight == 0:
                return True
        if self._drain_started is not None:
            if in_flight == 0:
                return True
            if time.monotonic() - self._drain_started > self._drain_timeout:
                log.warning("drain timeout: %d requests still in flight", in_flight)
                return True
        return await super().on_tick(counter)


def check_artifact(model_dir: Path) -> None:
    """A folder with an `artifact.json` is served only if every file matches its recorded digest."""
    from core.artifact import MANIFEST_NAME, verify_artifact

    if (model_dir / MANIFEST_NAME).is_file():
        manifest = verify_artifact(model_dir)
        log.info("artifact %s (%s): %d files verified", model_dir, manifest.kind, len(manifest.files))


def default_model_settings(settings: ServeSettings) -> ServeSettings:
    """The embedded SmolLM2 runs in float32 on CPU unless a dtype is asked for: measured here, vllm-cpu in
    bf16 answers "What is the capital of France?" with nonsense where transformers (bf16 and fp32) and
    vllm-cpu in fp32 answer "The capital of France is Paris." (135M parameters: fp32 costs ~0.5 GB)."""
    from serve.engine.vllm_engine import is_cpu_build

    if settings.vllm.dtype == "auto" and is_cpu_build():
        log.info("default model on CPU: dtype float32 (see docs/SERVING.md)")
        return settings.with_vllm(dtype="float32")
    return settings


def cpu_settings(settings: ServeSettings, model_dir: Path) -> ServeSettings:
    """On vllm-cpu: refuse what this CPU cannot run, and resolve `--dtype auto` for it
    (`serve.engine.cpu_support`); one log line names the CPU kind and vLLM's kernel library."""
    from serve.engine import cpu_features, cpu_support
    from serve.engine.vllm_engine import is_cpu_build

    if not is_cpu_build():
        return settings
    cpu = cpu_features.probe()
    log.info("%s", cpu.describe())
    cpu_support.check_runs_here(model_dir, cpu)
    dtype, note = cpu_support.resolve_dtype(settings.vllm.dtype, cpu)
    if note:
        log.info("%s", note)
    return settings.with_vllm(dtype=dtype)


def uvicorn_config(app: Any, settings: ServeSettings) -> uvicorn.Config:
    """uvicorn's configuration from vLLM's front-end options (host, port or unix socket, TLS, log level,
    access log, h11 limits) as vLLM's own server passes them."""
    args = settings.vllm
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        uds=args.uds,
        log_level=args.uvicorn_log_level,
        access_log=not args.disable_uvicorn_access_log,
        ssl_keyfile=args.ssl_keyfile,
        ssl_certfile=args.ssl_certfile,
        ssl_ca_certs=args.ssl_ca_certs,
        ssl_cert_reqs=args.ssl_cert_reqs,
        ssl_ciphers=args.ssl_ciphers or "TLSv1",
        timeout_graceful_shutdown=5,
    )
    config.h11_max_incomplete_event_size = args.h11_max_incomplete_event_size  # as vLLM's launcher sets them
    config.h11_max_header_count = args.h11_max_header_count  # type: ignore[attr-defined]
    if args.disable_access_log_for_endpoints:  # after uvicorn.Config, which configures its loggers
        quiet = frozenset(p.strip() for p in args.disable_access_log_for_endpoints.split(",") if p.strip())
        logging.getLogger("uvicorn.access").addFilter(_AccessLogFilter(quiet))
    return config


class _AccessLogFilter(logging.Filter):
    """vLLM's `--disable-access-log-for-endpoints`: no access-log line for these paths (query ignored)."""

    def __init__(self, paths: frozenset[str]) -> None:
        super().__init__()
        self._paths = paths

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        path = str(args[2]).split("?", 1)[0] if len(args) >= 3 else ""  # uvicorn: client, method, path, ...
        return path not in self._paths


async def _serve(settings: ServeSettings, model_dir: Path) -> None:
    from vllm.envs import enable_envs_cache

    from serve.app import build_app, default_router
    from serve.engine.vllm_engine import VLLMEngine
    from serve.openai.adapters.serving import start_router

    router = default_router(settings, model_dir)
    for name, path in settings.adapters().items():
        if not path.is_dir():
            raise StackError(f"LoRA adapter {name!r}: {path} is not a folder")
    specs = settings.adapter_specs()
    started = time.monotonic()
    engine = EngineSupervisor(
        lambda: VLLMEngine.start(settings, model_dir),  # a replacement starts with the same settings
        VLLMEngine.start(settings, model_dir),
        restart_policy(settings),
        start_seconds=time.monotonic() - started,
    )
    try:
        app = build_app(settings, engine, await start_router(settings, model_dir, engine, router, specs))
        config = uvicorn_config(app, settings)
        server = DrainingServer(config, app.state.server, settings.drain_timeout_seconds)
        # Start-up is over and nothing changes the environment from here on: cache vLLM's environment
        # variables, as its engine core does. Its output path reads one per token per request
        # (`IterationStats.update_from_output`), 4.1 us uncached vs 0.9 us cached (measured on the Xeon).
        enable_envs_cache()
        scheme = "https" if settings.vllm.ssl_certfile else "http"
        where = f"unix:{settings.vllm.uds}" if settings.vllm.uds else f"{settings.host}:{settings.port}"
        url = f"{scheme}://{where}/v1"
        log.info("serving %s as %r at %s", model_dir, router.base_name, url)
        print(f"serve: {router.base_name} at {url}", flush=True)  # noqa: T201  (the CLI's one line of output)
        await server.serve()
        if server.engine_died:
            why = server.engine_failure
            raise EngineDiedError(f"the engine died for good ({why}); exiting for a restart")
    finally:
        engine.shutdown()


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self._prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self._prefix)


def quiet_vllm_cpu_import_notice() -> None:
    """vllm-cpu warns at import, on every start, that Triton has no CPU backend (the build is meant to run
    without it): nothing a user can act on, and it would come before the one-line error of a bad flag now
    that vLLM's parser reads the command line."""
    logging.getLogger("vllm.triton_utils.importing").addFilter(_DropMessage("Triton is installed, but"))


def start_up(prog: str, argv: list[str] | None) -> tuple[ServeSettings, Path]:
    """What every engine-starting entry point (`serve`, `serve.headless`) does first: settings from flags
    and environment, logging, vLLM's environment defaults, the model folder (verified if it is an
    artifact; the embedded default otherwise) and the dtype this CPU runs. A user error exits 2 with one
    line prefixed by `prog`."""
    quiet_vllm_cpu_import_notice()
    try:
        settings = parse_settings(argv)
    except ValidationError as err:
        sys.stderr.write(f"{prog}: error: {describe_validation_error(err, top_level='settings')}\n")
        sys.exit(2)
    except StackError as err:  # a bad or refused vLLM option (one line, as argparse's usage errors)
        sys.stderr.write(f"{prog}: error: {err}\n")
        sys.exit(2)
    except SettingsError as err:  # an environment value pydantic-settings cannot decode (lists are JSON)
        hint = """list settings are JSON lists in the environment, e.g. LLMSTACK_API_KEY='["key-1"]'"""
        sys.stderr.write(f"{prog}: error: {err}; {hint}\n")
        sys.exit(2)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    apply_env_defaults(settings)
    try:
        from core.default_model import ensure_default_model
        from core.models import resolve_model_dir

        if settings.model:
            model_dir = resolve_model_dir(settings.model)
            check_artifact(model_dir)
        else:
            model_dir = ensure_default_model()
            settings = default_model_settings(settings)
        return cpu_settings(settings, model_dir), model_dir
    except StackError as err:
        sys.stderr.write(f"{prog}: error: {err}\n")
        sys.exit(2)


def exit_on_sigterm() -> None:
    """Until uvicorn installs its drain handler: SIGTERM exits like SIGINT does (an exception, so that
    `finally` blocks and vLLM's finalizers stop the engine processes started so far). Python's default
    SIGTERM action ends the process at once and left vLLM's engine core running, orphaned (seen when a
    server was stopped while it loaded)."""

    def raise_exit(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, raise_exit)


def main(argv: list[str] | None = None) -> None:
    settings, model_dir = start_up("serve", argv)
    if settings.vllm.headless:  # vLLM's `--headless`: this node's engine ranks, no API server
        from serve.headless import serve_headless

        serve_headless(settings, model_dir, "serve")
        return
    exit_on_sigterm()
    try:
        # uvloop where installed, as `uvicorn.run` and vLLM's own server do (asyncio.run would not): the
        # event loop and socket writes of every streamed chunk run in C.
        with asyncio.Runner(loop_factory=auto_loop_factory(use_subprocess=False)) as runner:
            runner.run(_serve(settings, model_dir))
    except StackError as err:
        sys.stderr.write(f"serve: error: {err}\n")
        sys.exit(2)
    except EngineDiedError as err:
        sys.stderr.write(f"serve: error: {err}\n")
        # The engine is already shut down; skip the interpreter's teardown of torch and vLLM, which took
        # 9-19 s here (a garbage collection of their module graphs) and would keep a supervisor waiting.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(ENGINE_DEAD_EXIT_CODE)


if __name__ == "__main__":
    main()
