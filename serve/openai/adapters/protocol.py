"""Wire models of the adapter management API."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from adapters.discovery import NAME_PATTERN
from adapters.registry import AdapterEntry
from core.config import StrictModel


class LoadAdapterRequest(StrictModel):
    name: str = Field(pattern=NAME_PATTERN, description="The name clients will pass as `model`.")
    path: str = Field(min_length=1, description="PEFT adapter folder on the server's file system.")


class VllmLoadLoraRequest(BaseModel):
    """vLLM's `/v1/load_lora_adapter` body (its other fields, e.g. `load_inplace`, are ignored)."""

    lora_name: str = Field(pattern=NAME_PATTERN)
    lora_path: str = Field(min_length=1)


class VllmUnloadLoraRequest(BaseModel):
    """vLLM's `/v1/unload_lora_adapter` body (`lora_int_id` is accepted and ignored: names are unique)."""

    lora_name: str
    lora_int_id: int | None = None


class AdapterCard(BaseModel):
    object: Literal["adapter"] = "adapter"
    name: str
    path: str
    parent: str = Field(description="The served base model this adapter applies to.")
    base_model: str | None = Field(description="`base_model_name_or_path` from adapter_config.json.")
    rank: int
    alpha: float
    target_modules: list[str]
    lora_id: int
    loaded_at: datetime
    requests: int = Field(description="Requests served (or being served) since it was loaded.")
    in_flight: int

    @classmethod
    def of(cls, entry: AdapterEntry, parent: str) -> AdapterCard:
        return cls(
            name=entry.name,
            path=str(entry.path),
            parent=parent,
            base_model=entry.info.base_model,
            rank=entry.info.rank,
            alpha=entry.info.alpha,
            target_modules=list(entry.info.target_modules),
            lora_id=entry.lora_id,
            loaded_at=entry.loaded_at,
            requests=entry.requests,
            in_flight=entry.in_flight,
        )


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterCard]
