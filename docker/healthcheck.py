"""Container healthcheck of the serving images: exit 0 iff `GET /ready` on the local server answers 200.

Stdlib only (the images carry no curl). The port is the server's own setting, `LLMSTACK_PORT` (default 8000).
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def ready_url() -> str:
    """The readiness URL of the server in this container."""
    return f"http://127.0.0.1:{os.environ.get('LLMSTACK_PORT', '8000')}/ready"


def check(url: str, timeout: float = 5.0) -> int:
    """0 when `url` answers 200, else 1 (any other status, refused connection, timeout)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError):
        return 1


if __name__ == "__main__":
    sys.exit(check(ready_url()))
