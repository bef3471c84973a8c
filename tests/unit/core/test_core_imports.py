"""`core` must stay importable without the server stack: it never imports FastAPI or vLLM."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import core

FORBIDDEN = ("fastapi", "starlette", "uvicorn", "vllm")


def test_core_imports_no_server_code() -> None:
    modules = [f"core.{m.name}" for m in pkgutil.iter_modules(core.__path__)]
    assert modules, "no core modules found"
    code = (
        "import sys\n"
        f"for name in {modules!r}: __import__(name)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "", f"core pulled in: {result.stdout.strip()}"
