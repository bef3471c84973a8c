"""The server's shared state, reachable from handlers as `request.app.state.server`.

Invariants: `draining` and `engine_dead` only go from False to True; `in_flight` counts API requests whose
response has not finished (streams included), so a drain can wait for it to reach zero; `settings` holds no
API key (they live in `keys`, as digests only).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

from adapters.routing import ModelRouter
from serve import metrics
from serve.admission import Admission
from serve.auth import KeyRing
from serve.engine.protocol import Engine
from serve.settings import ServeSettings

if TYPE_CHECKING:
    from serve.openai.request_log import RequestLog


@dataclass
class ServerState:
    settings: ServeSettings
    engine: Engine
    router: ModelRouter
    keys: KeyRing
    admission: Admission
    model_labels: metrics.BoundedLabels
    key_labels: metrics.BoundedLabels
    draining: bool = False
    # Dead for good (a plain engine died, or the supervisor gave up): the process is about to exit. A restart
    # in progress is not this: the supervisor (serve.engine.supervisor) answers for the engine meanwhile.
    engine_dead: bool = False
    in_flight: int = 0

    @classmethod
    def create(cls, settings: ServeSettings, engine: Engine, router: ModelRouter) -> ServerState:
        return cls(
            settings=settings.with_vllm(api_key=None).model_copy(update={"admin_api_key": []}),
            engine=engine,
            router=router,
            keys=KeyRing.from_settings(settings),
            admission=Admission(
                settings.max_concurrent_requests, settings.max_queued_requests, settings.retry_after_seconds
            ),
            model_labels=metrics.BoundedLabels(settings.metrics_max_model_labels, always=(router.base_name,)),
            key_labels=metrics.BoundedLabels(settings.metrics_max_key_labels, always=(metrics.ANONYMOUS,)),
        )

    def count_key(self, key_id: str) -> None:
        metrics.API_KEY_REQUESTS.labels(self.key_labels(key_id)).inc()

    def model_label(self, model: str) -> str:
        return self.model_labels(model)

    @cached_property
    def chat_template_kwargs(self) -> dict[str, Any]:
        """`--default-chat-template-kwargs`: under every request's own `chat_template_kwargs`."""
        return dict(getattr(self.settings.vllm, "default_chat_template_kwargs", None) or {})

    @cached_property
    def prompt_tokens_details(self) -> bool:
        """`--enable-prompt-tokens-details`: usage carries `prompt_tokens_details.cached_tokens`."""
        return bool(getattr(self.settings.vllm, "enable_prompt_tokens_details", False))

    @cached_property
    def force_include_usage(self) -> bool:
        """`--enable-force-include-usage`: every stream ends with a usage chunk, asked for or not."""
        return bool(getattr(self.settings.vllm, "enable_force_include_usage", False))

    @cached_property
    def response_role(self) -> str:
        """`--response-role`: the role of chat answers (vLLM's default: assistant)."""
        return str(getattr(self.settings.vllm, "response_role", None) or "assistant")

    @cached_property
    def exclude_tools_when_none(self) -> bool:
        """`--exclude-tools-when-tool-choice-none`: tool_choice "none" renders no tools into the prompt."""
        return bool(getattr(self.settings.vllm, "exclude_tools_when_tool_choice_none", False))

    @cached_property
    def request_id_headers(self) -> bool:
        """`--enable-request-id-headers`: API responses carry X-Request-Id."""
        return bool(getattr(self.settings.vllm, "enable_request_id_headers", False))

    @cached_property
    def system_fingerprint(self) -> str | None:
        """OpenAI's `system_fingerprint` of answers, as vLLM's `--fingerprint-mode` builds it."""
        from serve.frontend import system_fingerprint

        return system_fingerprint(self.settings.vllm, getattr(self.engine, "vllm_config", None))

    @cached_property
    def request_log(self) -> RequestLog | None:
        """vLLM's request logging, when `--enable-log-requests` is on."""
        from serve.openai.request_log import RequestLog

        return RequestLog.from_args(self.settings.vllm)

    @cached_property
    def sse_keep_alive_interval(self) -> float:
        """`--sse-keep-alive-interval` seconds (0: off): chat/completion streams send a comment when idle."""
        return float(getattr(self.settings.vllm, "sse_keep_alive_interval", 0) or 0)

    @cached_property
    def vocab_size(self) -> int:
        """Token ids a request may name are in [0, vocab_size) (the tokenizer's, added tokens included)."""
        return len(self.engine.tokenizer)

    @cached_property
    def special_ids(self) -> frozenset[int]:
        """The tokenizer's special token ids (TGI marks generated tokens with `special`)."""
        return frozenset(int(t) for t in self.engine.tokenizer.all_special_ids)

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """`text`'s token ids, as `tokenizer(text).input_ids` gives them. A fast tokenizer's Rust backend is
        called directly: the Python wrapper costs more than the tokenization itself on short prompts (and
        tests/unit/serve check that both agree)."""
        tokenizer = self.engine.tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            return list(backend.encode(text, add_special_tokens=add_special_tokens).ids)
        return list(tokenizer(text, add_special_tokens=add_special_tokens).input_ids)
