"""The server's shared state, reachable from handlers as `request.app.state.server`.

Invariant: `draining` only goes from False to True; `in_flight` counts API requests whose response has not
finished (streams included), so a drain can wait for it to reach zero.
"""

from __future__ import annotations

from dataclasses import dataclass

from adapters.routing import ModelRouter
from serve import metrics
from serve.admission import Admission
from serve.auth import KeyRing
from serve.engine.protocol import Engine
from serve.settings import ServeSettings


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
    in_flight: int = 0

    @classmethod
    def create(cls, settings: ServeSettings, engine: Engine, router: ModelRouter) -> ServerState:
        return cls(
            settings=settings,
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
