"""Random-init PEFT LoRA adapters for the tiny test models (deterministic by seed, no training).

PEFT initialises B to zero, which would make an adapter a no-op; here A and B are both drawn from a
seeded generator so every adapter changes the model's outputs, and two seeds give two different adapters.
The folders are written by PEFT's own `save_pretrained`, exactly as any PEFT trainer writes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_lora_adapter(
    base_dir: Path,
    out_dir: Path,
    *,
    seed: int,
    rank: int = 8,
    alpha: int = 16,
    target_modules: Sequence[str] = ALL_LINEAR,
    std: float = 0.1,
) -> Path:
    """Write a PEFT LoRA adapter for `base_dir` into `out_dir` (adapter_config.json + safetensors).

    `adapter_config.json` names `base_dir` as `base_model_name_or_path`, as PEFT does for a local base.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    from core.models import load_causal_lm

    base = load_causal_lm(base_dir, dtype=torch.float32)
    config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=0.0, task_type="CAUSAL_LM"
    )
    model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    model.save_pretrained(str(out_dir))
    return Path(out_dir)


def merge_lora(base_dir: Path, adapter_dir: Path, out_dir: Path) -> Path:
    """Write the base model with the adapter merged in (peft `merge_and_unload`), plus the base tokenizer."""
    import torch
    from peft import PeftModel

    from core.models import load_causal_lm, load_tokenizer

    base = load_causal_lm(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.save_pretrained(out_dir)
    load_tokenizer(base_dir).save_pretrained(out_dir)
    return Path(out_dir)
