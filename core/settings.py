"""Settings base shared by every entry point.

Invariant: settings objects are validated once, at start-up; a value that would only fail later (a
placeholder secret, a missing path) is refused here with every problem reported together.
"""

from __future__ import annotations

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

# Values people paste from examples. A key equal to (or made only of) one of these is refused.
PLACEHOLDER_SECRETS = frozenset(
    {
        "changeme",
        "change-me",
        "change_me",
        "changethis",
        "secret",
        "password",
        "apikey",
        "api-key",
        "api_key",
        "your-api-key",
        "your_api_key",
        "sk-xxx",
        "sk-...",
        "token",
        "test",
        "example",
        "default",
        "xxx",
        "none",
        "null",
    }
)
MIN_SECRET_LENGTH = 8


class StackSettings(BaseSettings):
    """Base class: strict (unknown fields are errors), environment prefix set by each subclass."""

    model_config = SettingsConfigDict(extra="forbid", validate_default=True, env_nested_delimiter="__")


def placeholder_reason(secret: str | SecretStr) -> str | None:
    """Why `secret` looks like a placeholder, or None when it looks like a real secret."""
    value = secret.get_secret_value() if isinstance(secret, SecretStr) else secret
    lowered = value.strip().lower()
    if lowered in PLACEHOLDER_SECRETS:
        return f"the value {value!r} is a well-known placeholder"
    if len(set(lowered)) <= 2:
        return "the value repeats one or two characters"
    if len(value) < MIN_SECRET_LENGTH:
        return f"the value is shorter than {MIN_SECRET_LENGTH} characters"
    return None
