"""Model routing: which model a request's `model` names — the base model or a LoRA adapter.

The contract (`Route`, `ModelEntry`, `ModelRouter`) is what the HTTP layer uses. `BaseModelRouter` serves the
base model alone (LoRA off); `adapters.registry.AdapterRegistry` implements the same protocol when LoRA is
on (start-up adapters and run-time load/unload). Both live in `adapters` so that `serve` depends on
`adapters` and never the other way round.

Invariants: an adapter's int id is stable for the server's lifetime and never 0 (vLLM reserves it); an
unknown name raises `ModelNotFound` (the server answers 404 with `param: "model"`).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from core.errors import StackError

if TYPE_CHECKING:
    from vllm.lora.request import LoRARequest


class ModelNotFound(StackError):
    """A request named a model that is neither the base model nor a servable adapter."""

    def __init__(self, model: str) -> None:
        super().__init__(f"the model {model!r} does not exist")
        self.model = model


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
        """The route for a request's `model`; raises `ModelNotFound` if unknown."""
        ...

    def models(self) -> list[ModelEntry]:
        """The base model first, then every adapter currently servable."""
        ...

    def lease(self, route: Route) -> AbstractContextManager[None]:
        """Held while a request runs on `route` (unloading its adapter waits for it); `ModelNotFound` if the
        adapter went away since `resolve`."""
        ...


def base_entries(name: str, root: str, aliases: tuple[str, ...]) -> list[ModelEntry]:
    """The /v1/models rows of the base model: its name, then each alias (`--served-model-name a b`)."""
    return [ModelEntry(n, root, None) for n in (name, *aliases)]


class BaseModelRouter:
    """The base model alone: the router of a server without LoRA."""

    def __init__(self, base_name: str, base_root: str, aliases: tuple[str, ...] = ()) -> None:
        self._base_name = base_name
        self._base_root = base_root
        self._aliases = aliases

    @property
    def base_name(self) -> str:
        return self._base_name

    @property
    def aliases(self) -> tuple[str, ...]:
        """The base model's other served names."""
        return self._aliases

    def resolve(self, model: str) -> Route:
        if model == self._base_name or model in self._aliases:
            return Route(self._base_name, None)
        raise ModelNotFound(model)

    def models(self) -> list[ModelEntry]:
        return base_entries(self._base_name, self._base_root, self._aliases)

    def lease(self, route: Route) -> AbstractContextManager[None]:
        return nullcontext()
