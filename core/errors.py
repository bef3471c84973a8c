"""The project's error hierarchy.

Every error a user can cause derives from `StackError` and carries a one-line, actionable message; the CLIs
print that line and exit 2, the server maps it to an OpenAI error body.
"""

from __future__ import annotations


class StackError(Exception):
    """Base of every user-facing error. `str(err)` is a complete one-line message."""


class ConfigError(StackError):
    """Invalid settings, flags or recipe values."""


class ArtifactError(StackError):
    """An artifact folder is missing, malformed or does not match its manifest."""


class ModelLoadError(StackError):
    """A model or tokenizer cannot be found or loaded."""


class DataError(StackError):
    """Input data (calibration text, training records) is missing, empty or malformed."""
