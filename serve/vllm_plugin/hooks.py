"""`after_import(module, callback)`: run a fix on a vLLM module once it is imported, never importing it early.

Some fixes patch vLLM modules that cost seconds of CPU to import and that a given process may never need (the
API process of an unquantized model never imports vLLM's kernel lists). Importing them in the plugin would
make every process pay; instead the fix runs right after the process imports the module itself.

Invariant: `callback` runs exactly once per process per registration, after the module's code has run and
before the importer gets the module back.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Callable, Sequence
from types import ModuleType


def after_import(name: str, callback: Callable[[], object]) -> None:
    """Call `callback()` now if module `name` is imported, else right after it is imported."""
    if name in sys.modules:
        callback()
        return
    sys.meta_path.insert(0, _AfterImport(name, callback))


class _AfterImport(importlib.abc.MetaPathFinder):
    """A one-shot finder: finds `name` with the other finders and wraps its loader to call `callback`."""

    def __init__(self, name: str, callback: Callable[[], object]) -> None:
        self.name = name
        self.callback = callback

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the find_spec below from finding us again
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        inner, callback = spec.loader, self.callback

        class _Loader(importlib.abc.Loader):
            def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
                return inner.create_module(spec)

            def exec_module(self, module: ModuleType) -> None:
                inner.exec_module(module)
                callback()

        spec.loader = _Loader()
        return spec
