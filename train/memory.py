"""Training memory estimator for decoder-only (Llama-family) models.

Invariant: every term is computed from the model's config alone (no weights are loaded), in bytes:
- weights: all parameters at the weight dtype; LoRA adds its A/B matrices;
- gradients and AdamW states (two moments): fp32 for the trainable parameters only;
- activations kept for backward, per token and layer, as counted from the tensors autograd saves in
  Hugging Face Llama layers in fp32 eager mode with SDPA attention (no s^2 term: SDPA keeps O(s) state):
  full fine-tuning 9h + 4I floats, LoRA 17h + 5I (frozen linears keep no input for weight gradients, but
  the LoRA branches keep their dropout inputs), plus 3h for the final norm; with gradient checkpointing
  only each layer's input (h) is kept, plus one layer's activations during its recomputation;
- logits: logits, their fp32 shifted copy, log-softmax and its gradient (4 b s V floats);
- KV cache (for generation at this length, not part of training): 2 L kv_heads head_dim b s.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from core.errors import ConfigError

Method = Literal["lora", "full"]
FP32 = 4
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per term, and totals without and with gradient checkpointing."""

    params: int
    trainable_params: int
    weights: int
    gradients: int
    optimizer_states: int
    activations: int
    activations_checkpointed: int
    logits: int
    kv_cache: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer_states + self.activations + self.logits

    @property
    def total_checkpointed(self) -> int:
        return (
            self.weights
            + self.gradients
            + self.optimizer_states
            + self.activations_checkpointed
            + self.logits
        )

    def predicted(self, *, gradient_checkpointing: bool) -> int:
        """The total for a run with or without gradient checkpointing."""
        return self.total_checkpointed if gradient_checkpointing else self.total

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total, "total_checkpointed": self.total_checkpointed}


def _linear_shapes(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear layer of one decoder layer."""
    h, inter = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    d = config.get("head_dim") or h // heads
    return {
        "q_proj": (h, heads * d),
        "k_proj": (h, kv * d),
        "v_proj": (h, kv * d),
        "o_proj": (heads * d, h),
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
        "down_proj": (inter, h),
    }


def estimate_memory(
    config: dict[str, Any],
    *,
    method: Method,
    seq_len: int,
    batch: int,
    weight_bytes: int = FP32,
    lora_rank: int = 8,
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS,
) -> MemoryEstimate:
    """Estimate training memory for `config` (a config.json dict)."""
    try:
        h, inter = config["hidden_size"], config["intermediate_size"]
        layers, vocab = config["num_hidden_layers"], config["vocab_size"]
    except KeyError as err:
        raise ConfigError(f"model config lacks {err.args[0]}: cannot estimate memory") from None
    if method not in ("lora", "full"):
        raise ConfigError(f"method must be lora or full, got {method!r}")
    shapes = _linear_shapes(config)
    per_layer = sum(i * o for i, o in shapes.values()) + 2 * h
    embeddings = vocab * h * (1 if config.get("tie_word_embeddings") else 2)
    params = layers * per_layer + embeddings + h
    if method == "lora":
        unknown = [t for t in lora_targets if t not in shapes]
        if unknown:
            raise ConfigError(f"unknown LoRA target module(s) {unknown}; known: {sorted(shapes)}")
        trainable = layers * sum(lora_rank * (shapes[t][0] + shapes[t][1]) for t in lora_targets)
        weights = params * weight_bytes + trainable * FP32
        per_token_layer = 17 * h + 5 * inter
    else:
        trainable = params
        weights = params * weight_bytes
        per_token_layer = 9 * h + 4 * inter
    tokens = seq_len * batch
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or h // heads
    return MemoryEstimate(
        params=params + (trainable if method == "lora" else 0),
        trainable_params=trainable,
        weights=weights,
        gradients=trainable * FP32,
        optimizer_states=2 * trainable * FP32,
        activations=tokens * (layers * per_token_layer + 3 * h) * FP32,
        activations_checkpointed=tokens * (layers * h + per_token_layer + 3 * h) * FP32,
        logits=4 * tokens * vocab * FP32,
        kv_cache=2 * layers * kv_heads * head_dim * tokens * weight_bytes,
    )


def format_estimate(estimate: MemoryEstimate) -> str:
    """A human-readable table in MiB."""
    rows = estimate.as_dict()
    lines = [
        f"{'params':<26}{rows.pop('params'):>14,}",
        f"{'trainable_params':<26}{rows.pop('trainable_params'):>14,}",
    ]
    lines += [f"{name + ' (MiB)':<26}{value / 2**20:>14.1f}" for name, value in rows.items()]
    return "\n".join(lines)
