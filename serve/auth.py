"""API keys: `Authorization: Bearer <key>` checked against sha256 digests with `secrets.compare_digest`.

Invariants: keys are never kept in plain text after start-up; every key is compared (no early exit that would
leak which key matched by timing); a key's metric id is its name from the keys file or the first 8 hex digits
of its digest, never the key.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from fastapi import Request

from serve.errors import OpenAIError
from serve.metrics import ANONYMOUS
from serve.settings import ServeSettings, parse_keys_file


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@dataclass(frozen=True)
class KeyRing:
    """Accepted key digests with their ids; empty means auth is off."""

    entries: tuple[tuple[bytes, str], ...]

    @classmethod
    def from_settings(cls, settings: ServeSettings) -> KeyRing:
        keys: list[tuple[str | None, str]] = [(None, k.get_secret_value()) for k in settings.api_key]
        if settings.api_keys_file is not None:
            keys += parse_keys_file(settings.api_keys_file.read_text())
        entries = []
        for name, key in keys:
            digest = _digest(key)
            entries.append((digest, name or digest.hex()[:8]))
        return cls(tuple(entries))

    @property
    def enabled(self) -> bool:
        return bool(self.entries)

    def identify(self, authorization: str | None) -> str:
        """The key id for an `Authorization` header value; 401 if auth is on and the key is missing/wrong."""
        if not self.enabled:
            return ANONYMOUS
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise OpenAIError(
                401, "missing API key: send `Authorization: Bearer <key>`", code="invalid_api_key"
            )
        presented = _digest(token.strip())
        match: str | None = None
        for digest, key_id in self.entries:
            if secrets.compare_digest(presented, digest):
                match = key_id
        if match is None:
            raise OpenAIError(401, "invalid API key", code="invalid_api_key")
        return match


async def key_id_of(request: Request) -> str:
    """The caller's key id (FastAPI dependency for API routes): checks the key, counts the request.

    `async` although it never awaits: FastAPI runs a plain `def` dependency in its thread pool, a thread
    hop per request for microseconds of work."""
    state = request.app.state.server
    key_id: str = state.keys.identify(request.headers.get("authorization"))
    state.count_key(key_id)
    return key_id
