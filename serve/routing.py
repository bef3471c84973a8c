"""Model routing: which model a request's `model` names — the base model or a LoRA adapter.

The interface (`ModelRouter`) is what the HTTP layer uses; `StaticRouter` serves the adapters given with
`--lora-modules` at start-up. A dynamic registry (runtime load/unload) implements the same protocol and is
installed with `build_app(..., router=...)`.

Invariants: an adapter's int id is stable for the server's lifetime and never 0 (vLLM reserves it); an
unknown name is a 404 with `param: "model"`.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from core.errors import ConfigError
from serve.errors import OpenAIError

if TYPE_CHECKING:
    from vllm.lora.request import LoRARequest


@dataclass(frozen=True)
class Route:
    """Where a request goes: `model` is the name it asked for; `lora` is None for the base model."""

    model: str
    lora: LoRARequest | None


@dataclass(frozen=True)
class ModelEntry:
    """One row of /v1/models; `parent` is the base model's name for an adapter, None for the base."""

    id: str
    root: str
    parent: str | None


class ModelRouter(Protocol):
    @property
    def base_name(self) -> str: ...

    def resolve(self, model: str) -> Route:
        """The route for a request's `model`; raises `OpenAIError(404, param="model")` if unknown."""
        ...

    def models(self) -> list[ModelEntry]:
        """The base model first, then every adapter currently servable."""
        ...

    def lease(self, route: Route) -> AbstractContextManager[None]:
        """Held while a request runs on `route` (unloading its adapter waits for it); 404 if the adapter
        went away since `resolve`."""
        ...


def unknown_model(model: str) -> OpenAIError:
    return OpenAIError(404, f"the model {model!r} does not exist", param="model", code="model_not_found")


class StaticRouter:
    """The base model plus the adapters fixed at start-up (ids 1, 2, ... in the order given)."""

    def __init__(self, base_name: str, base_root: str, adapters: dict[str, Path]) -> None:
        from vllm.lora.request import LoRARequest

        self._base_name = base_name
        self._base_root = base_root
        self._adapters = {
            name: LoRARequest(name, lora_id, str(path))
            for lora_id, (name, path) in enumerate(adapters.items(), 1)
        }
        if base_name in self._adapters:
            raise ConfigError(f"adapter name {base_name!r} clashes with the served model name")

    @property
    def base_name(self) -> str:
        return self._base_name

    def resolve(self, model: str) -> Route:
        if model == self._base_name:
            return Route(model, None)
        if model in self._adapters:
            return Route(model, self._adapters[model])
        raise unknown_model(model)

    def models(self) -> list[ModelEntry]:
        entries = [ModelEntry(self._base_name, self._base_root, None)]
        entries += [ModelEntry(n, r.lora_path, self._base_name) for n, r in self._adapters.items()]
        return entries

    def lease(self, route: Route) -> AbstractContextManager[None]:
        return nullcontext()
