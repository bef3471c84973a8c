"""API keys with roles: `Authorization: Bearer <key>` checked against sha256 digests with
`secrets.compare_digest`. The one place where keys are checked, for every route.

Roles: `user` keys (`--api-key`, `--api-keys-file`) open the inference API; `admin` keys
(`--admin-api-key`) open the adapter management API. With no user keys the inference API is open; with no
keys at all the management API is open too, like every other route.

Invariants: after start-up keys exist only as digests (the server's settings keep none of them); every key of
a role is compared (no early exit that would leak which key matched by timing); a key's metric id is its name
from the keys file or the first 8 hex digits of its digest, never the key.
"""

from __future__ import annotations

import enum
import hashlib
import secrets
from dataclasses import dataclass

from fastapi import Request

from serve.errors import OpenAIError
from serve.metrics import ANONYMOUS
from serve.settings import ServeSettings, parse_keys_file


class Role(enum.Enum):
    USER = "user"
    ADMIN = "admin"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@dataclass(frozen=True)
class KeyRing:
    """Accepted key digests with their ids and roles."""

    entries: tuple[tuple[bytes, str, Role], ...]

    @classmethod
    def from_settings(cls, settings: ServeSettings) -> KeyRing:
        keys: list[tuple[str | None, str, Role]] = [(None, key, Role.USER) for key in settings.api_keys]
        if settings.api_keys_file is not None:
            keys += [
                (name, key, Role.USER) for name, key in parse_keys_file(settings.api_keys_file.read_text())
            ]
        keys += [(None, k.get_secret_value(), Role.ADMIN) for k in settings.admin_api_key]
        entries = []
        for name, key, role in keys:
            digest = _digest(key)
            entries.append((digest, name or digest.hex()[:8], role))
        return cls(tuple(entries))

    def _has(self, role: Role) -> bool:
        return any(r is role for _, _, r in self.entries)

    def authorize(self, authorization: str | None, role: Role = Role.USER) -> str:
        """The caller's key id if its key opens `role`; `anonymous` where `role` needs no key. A missing
        key is a 401; a wrong one is a 401 on the inference API and a 403 on the management API (as
        before roles were one key ring)."""
        required = self._has(Role.USER) if role is Role.USER else bool(self.entries)
        if not required:
            return ANONYMOUS
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise OpenAIError(
                401, "missing API key: send `Authorization: Bearer <key>`", code="invalid_api_key"
            )
        presented = _digest(token.strip())
        match: str | None = None
        for digest, key_id, key_role in self.entries:
            if key_role is role and secrets.compare_digest(presented, digest):
                match = key_id
        if match is not None:
            return match
        if role is Role.USER:
            raise OpenAIError(401, "invalid API key", code="invalid_api_key")
        raise OpenAIError(
            403, "managing adapters needs an admin API key (--admin-api-key)", code="insufficient_permissions"
        )


def authorize(request: Request, role: Role = Role.USER, *, x_api_key: bool = False) -> str:
    """Check the caller's key for `role` and count the request under its key id (first line of every
    route that needs a key; a plain call, not a FastAPI dependency, which would cost a thread hop or a
    dependency-graph walk per request). `x_api_key`: Anthropic's `x-api-key: <key>` header is accepted as
    well as a bearer key (the Messages API routes)."""
    state = request.app.state.server
    authorization = request.headers.get("authorization")
    if x_api_key and not authorization and (key := request.headers.get("x-api-key")):
        authorization = f"Bearer {key}"
    try:
        key_id: str = state.keys.authorize(authorization, role)
    except OpenAIError as err:
        if x_api_key and authorization is None and err.status == 401:
            raise OpenAIError(
                401,
                "missing API key: send `x-api-key: <key>` or `Authorization: Bearer <key>`",
                code=err.code,
            ) from None
        raise
    state.count_key(key_id)
    return key_id
