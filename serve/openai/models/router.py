"""HTTP route of GET /v1/models: the base model, then every adapter with `parent` = the base model."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request

from serve.auth import authorize
from serve.openai.models.protocol import ModelCard, ModelList
from serve.state import ServerState

router = APIRouter()
_STARTED = int(time.time())


@router.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    authorize(request)
    state: ServerState = request.app.state.server
    max_len = state.engine.max_model_len
    cards = [
        ModelCard(id=m.id, created=_STARTED, root=m.root, parent=m.parent, max_model_len=max_len)
        for m in state.router.models()
    ]
    return ModelList(data=cards)
