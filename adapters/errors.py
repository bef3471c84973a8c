"""Adapter errors. Each is a `StackError` with a one-line message; the server maps them to HTTP statuses
(`AdapterError` 400, `AdapterNotFound` 404, `AdapterExists` 409)."""

from __future__ import annotations

from core.errors import StackError


class AdapterError(StackError):
    """An adapter is malformed, unreadable or does not fit the served base model."""


class AdapterNotFound(StackError):
    """No adapter of that name is registered."""


class AdapterExists(StackError):
    """An adapter of that name is already registered."""
