"""Configuration models and their errors: the one strict pydantic base, and the one way a validation error
becomes a one-line message.

Invariant: every configuration object of the project (recipes, method configs, manifests, adapter specs)
derives from `StrictModel`, so an unknown key is an error; every `ValidationError` that reaches a user is
rendered by `describe_validation_error`, so messages look the same from every entry point.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from core.errors import ConfigError


class StrictModel(BaseModel):
    """Base of configuration models: unknown fields are refused (a typo is an error, not a silent default)."""

    model_config = ConfigDict(extra="forbid")


M = TypeVar("M", bound=BaseModel)


def describe_problems(
    problems: Iterable[Mapping[str, Any]],
    *,
    top_level: str = "(top level)",
    limit: int = 0,
    skip_loc: tuple[str, ...] = (),
) -> str:
    """Validation problems (pydantic's `errors()` dicts) on one line: `a.b: msg; c: msg`. `limit` > 0 keeps
    the first ones; location parts in `skip_loc` (FastAPI's `body`) are left out."""
    parts = []
    for index, problem in enumerate(problems):
        if limit > 0 and index >= limit:
            break
        where = ".".join(str(p) for p in problem["loc"] if p not in skip_loc) or top_level
        parts.append(f"{where}: {str(problem['msg']).removeprefix('Value error, ')}")
    return "; ".join(parts)


def describe_validation_error(err: ValidationError, *, top_level: str = "(top level)", limit: int = 0) -> str:
    """Every problem of `err` on one line (see `describe_problems`)."""
    return describe_problems(err.errors(), top_level=top_level, limit=limit)


def validate_config(model: type[M], values: Mapping[str, Any] | Any, *, context: str = "") -> M:
    """`model` built from `values`; every problem is reported together in one `ConfigError` line,
    prefixed with `context` when given (for example the recipe's path)."""
    try:
        return model.model_validate(values)
    except ValidationError as err:
        message = describe_validation_error(err, top_level=model.__name__)
        raise ConfigError(f"{context}: {message}" if context else message) from None
