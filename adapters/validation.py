"""Validate a PEFT LoRA adapter folder against the served base model, before the engine sees it.

Checks, in order, each refusal an `AdapterError` naming the adapter and the reason:
1. the folder holds a readable `adapter_config.json` of a LoRA (`peft.LoraConfig`), no DoRA;
2. an adapter artifact (with `artifact.json`) matches its file digests, and the base model matches (see
   `check_base`);
3. rank (`r` and every `rank_pattern` value) ≤ `max_lora_rank`;
4. every target module names at least one linear layer of the base;
5. the weights file reads completely (a truncated file is refused), every tensor is finite, belongs to a
   linear layer of the base, and has the shape that layer needs (A: rank × in, B: out × rank).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters.base import BaseModelProfile, LinearShape
from adapters.discovery import ADAPTER_CONFIG
from adapters.errors import AdapterError
from core.artifact import MANIFEST_NAME, folder_digest, verify_artifact
from core.errors import StackError

log = logging.getLogger(__name__)

WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<part>lora_A|lora_B)(?:\.[^.]+)?\.weight$")


@dataclass(frozen=True)
class AdapterInfo:
    """What validation learnt about an adapter (shown by GET /v1/adapters)."""

    path: Path
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    base_model: str | None
    num_tensors: int


def validate_adapter(path: Path, base: BaseModelProfile, *, max_lora_rank: int) -> AdapterInfo:
    """`AdapterInfo` for a valid adapter; `AdapterError` for the first problem found."""
    path = Path(path).expanduser().resolve()
    config = read_lora_config(path)
    check_base(path, config.base_model_name_or_path, base)
    rank = max([int(config.r), *(int(r) for r in (config.rank_pattern or {}).values())])
    if rank > max_lora_rank:
        raise AdapterError(
            f"adapter {path} has rank {rank}, above the server's --max-lora-rank {max_lora_rank}"
        )
    targets = _targets(config.target_modules)
    _check_targets(path, targets, base)
    tensors = read_weights(path)
    _check_tensors(path, tensors, base, max_lora_rank)
    return AdapterInfo(
        path=path,
        rank=rank,
        alpha=float(config.lora_alpha),
        target_modules=targets,
        base_model=config.base_model_name_or_path,
        num_tensors=len(tensors),
    )


def read_lora_config(path: Path) -> Any:
    """The folder's `peft.LoraConfig`."""
    from peft import LoraConfig

    config_file = path / ADAPTER_CONFIG
    if not config_file.is_file():
        raise AdapterError(f"{path} is not a PEFT adapter folder: {ADAPTER_CONFIG} is missing")
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise AdapterError(f"{config_file} is not valid JSON: {err}") from None
    if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
        kind = raw.get("peft_type") if isinstance(raw, dict) else None
        raise AdapterError(f"adapter {path} is not a LoRA adapter (peft_type {kind!r})")
    if raw.get("use_dora"):
        raise AdapterError(f"adapter {path} is a DoRA adapter, which vLLM does not serve")
    try:
        return LoraConfig.from_pretrained(str(path))
    except (TypeError, ValueError) as err:
        raise AdapterError(f"{config_file} is not a valid LoRA config: {err}") from None


def check_base(adapter_dir: Path, declared: str | None, base: BaseModelProfile) -> None:
    """Refuse an adapter made for another base model.

    What identifies the base, strongest first: the adapter's own `artifact.json` (written by `train`; its
    file digests are verified first) records the digest of the model it was trained on, which must be the
    served model's or its source's; otherwise `base_model_name_or_path` matches if it is the served name,
    the served folder or the served artifact's source path; if it is another local model folder, their
    digests must match (a copy of the same model is accepted); a hub-style name matches the served name or
    folder name. A missing base name is accepted on shapes alone (with a warning).
    """
    if (adapter_dir / MANIFEST_NAME).is_file():
        try:
            source = verify_artifact(adapter_dir).source
        except StackError as err:
            raise AdapterError(f"adapter {adapter_dir}: {err}") from None
        if source is not None:
            if source.digest in base.digests():
                return
            raise AdapterError(
                f"adapter {adapter_dir} was trained on {source.path} (digest {source.digest[:12]}…), "
                f"not on the served model {base.name} (digest {base.digest[:12]}…)"
            )
    if not declared:
        log.warning("adapter %s does not name its base model; checked on shapes only", adapter_dir)
        return
    local = Path(declared).expanduser()
    if declared in base.aliases or (local.is_absolute() and str(local.resolve()) in base.aliases):
        return
    if local.is_dir() and (local / "config.json").is_file():
        if folder_digest(local) in base.digests():
            return
        raise AdapterError(
            f"adapter {adapter_dir} was made for the base model {declared}, a different model from the "
            f"served {base.name} ({base.path}): their files differ"
        )
    if declared.rstrip("/").rsplit("/", 1)[-1].lower() in {base.name.lower(), base.path.name.lower()}:
        return
    raise AdapterError(
        f"adapter {adapter_dir} was made for the base model {declared!r}, but the server serves "
        f"{base.name!r} ({base.path}); if they are the same model, serve it as --served-model-name {declared}"
    )


def read_weights(path: Path) -> dict[str, Any]:
    """Every tensor of the adapter's weights file, fully read (so truncation and corruption show here)."""
    weights = next((path / f for f in WEIGHT_FILES if (path / f).is_file()), None)
    if weights is None:
        raise AdapterError(f"adapter {path} has no weights file ({' or '.join(WEIGHT_FILES)})")
    try:
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors: dict[str, Any] = load_file(weights)
        else:
            import torch

            tensors = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors and torch raise several types for a damaged file
        raise AdapterError(
            f"adapter weights {weights} are unreadable ({type(err).__name__}: {err})"
        ) from None
    if not tensors:
        raise AdapterError(f"adapter weights {weights} hold no tensors")
    return tensors


def _targets(target_modules: Any) -> tuple[str, ...]:
    if target_modules is None:
        return ()
    if isinstance(target_modules, str):
        return (target_modules,)
    return tuple(sorted(target_modules))


def _check_targets(path: Path, targets: tuple[str, ...], base: BaseModelProfile) -> None:
    """Each target (a module-name suffix, or one regex as PEFT allows) must name a linear layer."""
    names = list(base.linear)
    if len(targets) == 1 and targets[0] == "all-linear":
        return
    if len(targets) == 1 and not targets[0].isidentifier():
        if not any(re.fullmatch(targets[0], name) for name in names):
            raise AdapterError(f"adapter {path}: target_modules {targets[0]!r} matches no linear layer")
        return
    missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if missing:
        raise AdapterError(
            f"adapter {path}: target modules {', '.join(missing)} do not exist in the base model {base.name}"
        )


def _check_tensors(path: Path, tensors: dict[str, Any], base: BaseModelProfile, max_lora_rank: int) -> None:
    import torch

    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise AdapterError(f"adapter {path}: tensor {key} is not a LoRA A/B weight this server can apply")
        shape: LinearShape | None = base.linear.get(match["module"])
        if shape is None:
            raise AdapterError(f"adapter {path}: tensor {key} is for a module the base model does not have")
        dims = tuple(tensor.shape)
        rank = dims[0] if match["part"] == "lora_A" else dims[-1]
        expected = (rank, shape.in_features) if match["part"] == "lora_A" else (shape.out_features, rank)
        if len(dims) != 2 or dims != expected:
            raise AdapterError(
                f"adapter {path}: tensor {key} has shape {list(dims)}, the base model needs {list(expected)}"
            )
        if rank > max_lora_rank:
            raise AdapterError(
                f"adapter {path}: tensor {key} has rank {rank}, above the server's --max-lora-rank "
                f"{max_lora_rank}"
            )
        if not bool(torch.isfinite(tensor).all()):
            raise AdapterError(f"adapter {path}: tensor {key} holds NaN or infinite values")
