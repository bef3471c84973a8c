"""Request bodies: parsed straight from the raw bytes by pydantic-core (no `json.loads` pass first, no
FastAPI dependency walk), with validation problems answered as OpenAI 400s.

Invariants: a body that does not validate never reaches a handler's logic; the 400 names the first bad
field in `param` and lists up to five problems in the message. Routes read bodies through
`authorized_body`, so a caller without the right key gets its 401/403 before its body is looked at.
"""

from __future__ import annotations

from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, TypeAdapter, ValidationError

from core.config import describe_problems
from serve.auth import Role, authorize
from serve.errors import OpenAIError

M = TypeVar("M", bound=BaseModel)


async def parse_body(request: Request, model: type[M] | TypeAdapter[M]) -> M:
    """`model` (a model class, or a `TypeAdapter` of a tagged union of them) validated from the request's
    JSON body (400 with `param` on the first problem; a union's tag is left out of the location)."""
    raw = await request.body() or b"null"
    try:
        if isinstance(model, TypeAdapter):
            return model.validate_json(raw)
        return model.model_validate_json(raw)
    except ValidationError as err:
        problems = err.errors()
        if isinstance(model, TypeAdapter):
            problems = [{**p, "loc": p["loc"][1:]} for p in problems]
        first = problems[0]["loc"] if problems else ()
        param = ".".join(str(p) for p in first) or None
        message = describe_problems(problems, top_level="body", limit=5) or "invalid request body"
        raise OpenAIError(400, message, param=param) from None


async def authorized_body(request: Request, model: type[M] | TypeAdapter[M], role: Role = Role.USER) -> M:
    """The request's body as `model` (`parse_body`), once the caller's key has been checked for `role`
    (`serve.auth.authorize`): the first line of every route that takes a body."""
    authorize(request, role)
    return await parse_body(request, model)
