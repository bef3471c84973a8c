"""Gradient (activation) checkpointing of the trained model.

Invariant: only the Hugging Face models inside the trained module are checkpointed (the LoRA-wrapped base, a
distillation student, a QAT model), never a frozen teacher, which the recipes keep outside it and run without
gradients. Each decoder layer keeps only its input during the forward and recomputes its activations in the
backward, with torch's non-reentrant checkpoint (`use_reentrant=False`), which replays the layer's RNG state
(so dropout masks match) and works with FSDP2's per-layer hooks. The embeddings' output is made to require
grad (transformers' `enable_input_require_grads`), so gradients reach checkpointed layers whose own inputs
are frozen (LoRA, where the embeddings are frozen).
"""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer

from core.errors import StackError

CHECKPOINT_KWARGS = {"use_reentrant": False}


class CheckpointingError(StackError):
    """Gradient checkpointing was asked for a module that has no Hugging Face model supporting it."""


def checkpointed_models(module: nn.Module) -> list[PreTrainedModel]:
    """The outermost Hugging Face models inside `module` (the module itself included)."""
    found: list[PreTrainedModel] = []
    inside: set[int] = set()
    for sub in module.modules():  # parents come before their children
        if id(sub) in inside or not isinstance(sub, PreTrainedModel):
            continue
        found.append(sub)
        inside.update(id(m) for m in sub.modules())
    return found


def enable_gradient_checkpointing(module: nn.Module) -> int:
    """Checkpoint every decoder layer of the Hugging Face models in `module`; return how many layers are
    checkpointed. Their KV cache is turned off (training keeps none; transformers would warn each step)."""
    models = checkpointed_models(module)
    unsupported = [type(m).__name__ for m in models if not m.supports_gradient_checkpointing]
    if not models or unsupported:
        what = ", ".join(unsupported) or f"{type(module).__name__} (no Hugging Face model inside)"
        raise CheckpointingError(f"gradient checkpointing is not supported by {what}")
    for model in models:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(CHECKPOINT_KWARGS))
        if not getattr(model, "_require_grads_hooks", None):  # transformers hooks input_ids models itself
            model.enable_input_require_grads()
        model.config.use_cache = False
    return checkpointed_layers(module)


def checkpointed_layers(module: nn.Module) -> int:
    """Layers of `module` that recompute their activations in the backward."""
    return sum(
        1 for m in module.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing
    )
