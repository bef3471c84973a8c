"""The request-field policy: what happens to a body field this server has no model field for.

- A field that OpenAI's API (Anthropic's, on the Messages API) or vLLM's server defines for the endpoint,
  and that this server does not implement, is a 400 naming the field: silently ignoring it would change
  what the client asked for.
- Any other unknown field is ignored, logged once per field name and counted in
  `llmstack:ignored_request_fields` (labels bounded): SDKs add fields of their own, and refusing them breaks
  the SDK, which is why vLLM itself stopped forbidding extra fields.

The "defined elsewhere" sets are read from the installed packages themselves (vLLM's request models and the
openai and anthropic SDKs' request parameter types), so they follow the pinned versions instead of a list
kept by hand; they are computed on the first request that carries an unknown field.

Invariant: a request model here validates with `extra="allow"`; `check_extra_fields` is called on every
parsed request before any work starts.
"""

from __future__ import annotations

import functools
import importlib
import logging
import threading

from pydantic import BaseModel, ConfigDict

from serve import metrics
from serve.errors import OpenAIError

log = logging.getLogger(__name__)

# Where each endpoint's fields are defined upstream: (module, attribute) of a pydantic model or TypedDict.
UPSTREAM_DEFINITIONS: dict[str, tuple[tuple[str, str], ...]] = {
    "chat": (
        ("vllm.entrypoints.openai.chat_completion.protocol", "ChatCompletionRequest"),
        ("openai.types.chat.completion_create_params", "CompletionCreateParamsBase"),
    ),
    "completions": (
        ("vllm.entrypoints.openai.completion.protocol", "CompletionRequest"),
        ("openai.types.completion_create_params", "CompletionCreateParamsBase"),
    ),
    "messages": (
        ("vllm.entrypoints.anthropic.protocol", "AnthropicMessagesRequest"),
        ("anthropic.types.message_create_params", "MessageCreateParamsBase"),
    ),
    "count_tokens": (
        ("vllm.entrypoints.anthropic.protocol", "AnthropicCountTokensRequest"),
        ("anthropic.types.message_count_tokens_params", "MessageCountTokensParams"),
    ),
}

_ignored_lock = threading.Lock()
_ignored_seen: set[str] = set()
IGNORED_FIELD_LABELS = metrics.BoundedLabels(32)


class OpenAIRequest(BaseModel):
    """Base of the OpenAI-style request bodies: unknown fields are kept aside for the field policy."""

    model_config = ConfigDict(extra="allow")


@functools.cache
def upstream_fields(endpoint: str) -> frozenset[str]:
    """Every field name OpenAI's SDK or vLLM's server defines for `endpoint` (imported on first use)."""
    names: set[str] = set()
    for module_name, attribute in UPSTREAM_DEFINITIONS.get(endpoint, ()):
        try:
            definition = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError):  # a package without that model: nothing to learn from it
            continue
        fields = getattr(definition, "model_fields", None)
        names.update(fields if fields is not None else getattr(definition, "__annotations__", {}))
    return frozenset(names)


def check_extra_fields(request: BaseModel, endpoint: str) -> None:
    """Apply the policy to the fields `request` has no model field for (see the module docstring)."""
    extra = request.model_extra
    if not extra:
        return
    known = upstream_fields(endpoint)
    refused = sorted(name for name in extra if name in known)
    if refused:
        raise OpenAIError(
            400,
            f"{refused[0]!r} is not supported by this server"
            + (f" (nor {', '.join(map(repr, refused[1:]))})" if len(refused) > 1 else ""),
            param=refused[0],
            code="unsupported_parameter",
        )
    for name in extra:
        metrics.IGNORED_REQUEST_FIELDS.labels(endpoint, IGNORED_FIELD_LABELS(name)).inc()
        if name not in _ignored_seen:
            with _ignored_lock:
                first = name not in _ignored_seen
                _ignored_seen.add(name)
            if first:
                log.info("ignoring unknown request field %r on %s (logged once per field)", name, endpoint)
