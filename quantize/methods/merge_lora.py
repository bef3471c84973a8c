"""LoRA merge: W ← W + Σ wᵢ·ΔWᵢ folded into the base weights with PEFT, saved as a plain model.

Invariant: the merged model computes what the base with the (weighted) adapters active computes; a quantized
base is refused unless forced, because merging would bake its quantization error into the result.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import ConfigError, ModelLoadError
from core.models import load_causal_lm, load_tokenizer, read_config
from quantize.config import MergeLoraConfig

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)
ADAPTER_CONFIG = "adapter_config.json"


def quantization_method(model_dir: Path) -> str | None:
    """The `quant_method` of a model folder's config, or None for a full-precision model."""
    quant = read_config(model_dir).get("quantization_config")
    return str(quant.get("quant_method", "unknown")) if isinstance(quant, dict) else None


def check_inputs(base: Path, config: MergeLoraConfig) -> None:
    """Refuse missing adapters and (unless forced) a quantized base, before anything is loaded."""
    for adapter in config.adapters:
        if not (adapter / ADAPTER_CONFIG).is_file():
            raise ModelLoadError(f"{adapter} is not a PEFT adapter folder: {ADAPTER_CONFIG} is missing")
    method = quantization_method(base)
    if method is None:
        return
    if not config.force:
        raise ConfigError(
            f"base {base} is quantized ({method}); merging into it bakes its quantization error into the "
            "merged weights: merge into the full-precision base, or pass --force"
        )
    if method != "bitsandbytes":
        raise ConfigError(f"--force can dequantize a bitsandbytes base only, not {method}")


def merge(base: Path, out: Path, config: MergeLoraConfig) -> dict[str, Any]:
    """Merge `config.adapters` into `base` and save the result to `out`; returns the method parameters."""
    from peft import PeftModel

    model = load_causal_lm(base, device_map="cpu")
    if quantization_method(base) is not None:
        log.warning("dequantizing quantized base %s before merging (--force)", base)
        model = model.dequantize()
    names = [f"adapter_{i}" for i in range(len(config.adapters))]
    weights = config.weights or [1.0] * len(names)
    try:
        peft_model = PeftModel.from_pretrained(model, config.adapters[0], adapter_name=names[0])
        for name, path in zip(names[1:], config.adapters[1:], strict=True):
            peft_model.load_adapter(path, adapter_name=name)
    except (ValueError, RuntimeError, KeyError) as err:
        raise ModelLoadError(f"adapter does not fit base {base}: {str(err).splitlines()[0]}") from None
    if names != ["adapter_0"] or weights != [1.0]:
        # "cat" stacks the scaled factors, so the combined delta is exactly Σ wᵢ·ΔWᵢ (no SVD approximation).
        peft_model.add_weighted_adapter(names, weights, adapter_name="combined", combination_type="cat")
        peft_model.set_adapter("combined")
        for name in names:
            peft_model.delete_adapter(name)
    merged = peft_model.merge_and_unload()
    if quantization_method(base) is not None:
        merged = _plain_copy(merged)
    merged.save_pretrained(out)
    load_tokenizer(base).save_pretrained(out)
    log.info("merged %d adapter(s) into %s", len(names), out)
    return {
        "adapters": [str(a) for a in config.adapters],
        "weights": weights,
        "base_quantization": quantization_method(base),
    }


def _plain_copy(model: PreTrainedModel) -> PreTrainedModel:
    """The same weights in a model built without any quantization config (a dequantized model still carries
    its loader's weight conversions, which `save_pretrained` cannot reverse)."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    plain.load_state_dict(model.state_dict())
    return plain
