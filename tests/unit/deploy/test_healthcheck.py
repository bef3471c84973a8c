"""docker/healthcheck.py (the serving images' HEALTHCHECK): exit 0 only when GET /ready answers 200."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.support.server import free_port
from tests.unit.deploy.tools import REPO_ROOT

SCRIPT = REPO_ROOT / "docker" / "healthcheck.py"


class _Ready(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/ready" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[ThreadingHTTPServer]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (_Ready,), {}))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def run_check(port: int) -> int:
    env = {"LLMSTACK_PORT": str(port), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, str(SCRIPT)], env=env, timeout=30, check=False).returncode


def test_ready_is_healthy(server: ThreadingHTTPServer) -> None:
    assert run_check(server.server_address[1]) == 0


def test_not_ready_is_unhealthy(server: ThreadingHTTPServer) -> None:
    server.RequestHandlerClass.status = 503  # type: ignore[attr-defined]
    assert run_check(server.server_address[1]) == 1


def test_nothing_listening_is_unhealthy() -> None:
    assert run_check(free_port()) == 1
