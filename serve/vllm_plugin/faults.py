"""Fault injection for tests of the engine supervisor (serve.engine.supervisor): an engine core that dies as
it starts, as one with a broken device or driver would.

Set `LLMSTACK_FAULT_ENGINE_CORE_EXIT_FILE` to a path: from the moment that file exists, every engine core
process that starts exits at once (status 86) when vLLM loads this plugin in it. Unset (always, outside
tests): nothing happens. Engine cores started before the file existed are not affected.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from pathlib import Path

FAULT_FILE_ENV = "LLMSTACK_FAULT_ENGINE_CORE_EXIT_FILE"
FAULT_EXIT_CODE = 86

log = logging.getLogger(__name__)


def install() -> None:
    """Exit now if this is an engine core process and the fault file exists."""
    path = os.environ.get(FAULT_FILE_ENV)
    if not path or not multiprocessing.current_process().name.startswith("EngineCore"):
        return
    if Path(path).exists():
        log.error("injected fault (%s=%s): the engine core exits", FAULT_FILE_ENV, path)
        os._exit(FAULT_EXIT_CODE)
