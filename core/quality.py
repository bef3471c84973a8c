"""Held-out evaluation of a model folder, optionally against a reference model: the measured quality every
artifact records (`quantize`'s and `train qat`'s alike), and the one way such an artifact is written
(`write_measured_artifact`).

Invariants: figures are token-weighted means over the same held-out tokens for both models (perplexity =
exp(mean next-token NLL); mean KL(reference || model) and top-1 agreement over every predicted position), so
an artifact and its source are always compared on identical inputs; a measured artifact's quality is that
of its files as written, measured before the folder is committed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import AfterValidator, Field

from core.artifact import (
    ArtifactKind,
    DataInfo,
    Manifest,
    ManifestDraft,
    Quality,
    SourceModel,
    folder_digest,
    tool_versions,
    write_artifact,
)
from core.config import StrictModel
from core.models import load_causal_lm, load_tokenizer
from core.textdata import data_info, load_samples, tokenize

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

SUPPORTED_BITS = (4, 8)  # weight bit widths the toolchain writes and QAT trains for


def _supported_bits(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(
            f"{bits}-bit weights are not supported (choose {' or '.join(map(str, SUPPORTED_BITS))})"
        )
    return bits


WeightBits = Annotated[int, AfterValidator(_supported_bits)]
"""A weight bit width the toolchain supports (the type of every config's `bits`)."""


class EvalConfig(StrictModel):
    """Held-out evaluation: perplexity, and against a reference model mean KL and top-1 agreement."""

    eval_data: str | None = Field(
        default=None,
        description="Held-out text (.txt/.jsonl). Default: the built-in corpus' held-out split, which never "
        "overlaps the built-in calibration split.",
    )
    eval_samples: int = Field(default=64, ge=1, description="Evaluation samples used (at most).")
    eval_seq_len: int = Field(default=256, ge=8, description="Tokens per evaluation sample (truncated).")


def load_for_eval(path: Path) -> PreTrainedModel:
    """A model as transformers loads it on this machine (quantized ones through their own layers)."""
    return load_causal_lm(path, device_map="cpu")


def evaluate(
    model_dir: Path, *, reference_dir: Path | None = None, config: EvalConfig | None = None
) -> Quality:
    """Perplexity of `model_dir` on held-out text; with `reference_dir`, also the reference's perplexity, the
    mean per-token KL(reference || model) and the top-1 agreement of the two."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    config = config or EvalConfig()
    texts, name = load_samples(config.eval_data, split="heldout", limit=config.eval_samples)
    tokenizer = load_tokenizer(reference_dir or model_dir)
    samples = tokenize(texts, tokenizer, config.eval_seq_len)
    model = load_for_eval(model_dir)
    reference = load_for_eval(reference_dir) if reference_dir is not None else None

    nll = ref_nll = kl = agree = 0.0
    tokens = 0
    with torch.inference_mode():
        for ids in tqdm(samples, desc="evaluating", unit="sample", leave=False):
            inputs = torch.tensor([ids])
            targets = inputs[0, 1:]
            logp = F.log_softmax(model(inputs).logits[0, :-1].float(), dim=-1)
            nll += -logp.gather(1, targets[:, None]).sum().item()
            tokens += len(targets)
            if reference is not None:
                ref_logp = F.log_softmax(reference(inputs).logits[0, :-1].float(), dim=-1)
                ref_nll += -ref_logp.gather(1, targets[:, None]).sum().item()
                kl += (ref_logp.exp() * (ref_logp - logp)).sum().item()
                agree += (ref_logp.argmax(-1) == logp.argmax(-1)).sum().item()
    quality = Quality(eval_data=data_info(name, texts, num_tokens=tokens), perplexity=math.exp(nll / tokens))
    if reference is not None:
        quality.perplexity_source = math.exp(ref_nll / tokens)
        quality.mean_kl = max(kl / tokens, 0.0)
        quality.top1_agreement = agree / tokens
    log.info("evaluation of %s: %s", model_dir, quality.model_dump(exclude={"eval_data", "extra"}))
    return quality


def write_measured_artifact(
    output: Path,
    kind: ArtifactKind,
    source: Path,
    write: Callable[[Path], dict[str, Any]],
    *,
    data: DataInfo | None,
    eval_config: EvalConfig | None,
    tools: Sequence[str],
    overwrite: bool,
    extra: Mapping[str, float] | None = None,
) -> Manifest:
    """Run `write(tmp)` (writes the model files into a temporary folder and returns the method parameters),
    evaluate those files against `source`, and commit the folder to `output` atomically with its manifest:
    `source`'s digest, the versions of the distributions `tools`, and the quality, whose `extra` gains the
    method-specific figures `extra` (read after `write` has run, so `write` may fill it)."""

    def populate(tmp: Path) -> ManifestDraft:
        parameters = write(tmp)
        quality = evaluate(tmp, reference_dir=source, config=eval_config)
        quality.extra.update(extra or {})
        return ManifestDraft(
            kind=kind,
            source=SourceModel(path=str(source), digest=folder_digest(source)),
            parameters=parameters,
            data=data,
            quality=quality,
            tool_versions=tool_versions(*tools),
        )

    return write_artifact(output, populate, overwrite=overwrite)
