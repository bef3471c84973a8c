"""Quantization quality, bounded: on the same tiny model, calibration text and held-out text, AWQ's and
GPTQ's mean KL from the full-precision model stays well below round-to-nearest's at the same bits and group
size (and NF4's below symmetric RTN's, at twice RTN's group size).

The model is `outlier_model_dir` (see there). On the random tiny model alone, whose weights and activations
have no salient channels, AWQ and RTN trade places from one group size to the next (measured: AWQ's KL 0.86x
RTN's at group size 32, 1.08x at 128), and a tiny model trained on the built-in corpus for 600 steps did not
separate them either (0.94x-1.03x): it grows no outlier channels. With the activation outliers of trained
LLMs the methods separate as they do on real models; the figures measured with the fixtures' settings are
in `BOUNDS`, each bound set with room for another CPU's rounding yet failing if a method falls back to RTN.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.artifact import verify_artifact
from core.models import load_causal_lm

BOUNDS = [  # (artifact, baseline: same bits and group size, its KL at most this fraction of the baseline's)
    ("awq_artifact", "rtn_artifact", 0.6),  # measured 0.36: AWQ against RTN on its asymmetric grid
    ("gptq_artifact", "rtn_symmetric_artifact", 0.7),  # 0.43: GPTQ against RTN on its symmetric grid
    ("gptq_artifact", "rtn_artifact", 1.0),  # 0.61: even below RTN on the asymmetric grid
    ("awq_classic_artifact", "rtn_artifact", 0.75),  # 0.49: gptqmodel's AWQ
    ("gptq_classic_artifact", "rtn_symmetric_artifact", 0.8),  # 0.53: gptqmodel's GPTQ
    ("nf4_artifact", "rtn_symmetric_artifact", 1.0),  # 0.64: NF4 levels in blocks of 64 vs int4 groups of 32
]


def _mean_kl(artifact: Path) -> float:
    kl = verify_artifact(artifact).quality.mean_kl
    assert kl is not None and kl > 0, f"{artifact}: no quantization error measured"
    return kl


def test_outlier_model_computes_what_the_tiny_model_computes(
    outlier_model_dir: Path, tiny_model_dir: Path
) -> None:
    inputs = torch.tensor([[1, 17, 300, 42, 1000, 7, 99, 512]])
    with torch.no_grad():
        outliers, plain = load_causal_lm(outlier_model_dir)(inputs), load_causal_lm(tiny_model_dir)(inputs)
    assert torch.equal(outliers.logits, plain.logits)


@pytest.mark.parametrize(("artifact", "baseline", "fraction"), BOUNDS)
def test_mean_kl_below_round_to_nearest(
    request: pytest.FixtureRequest, artifact: str, baseline: str, fraction: float
) -> None:
    kl = _mean_kl(request.getfixturevalue(artifact))
    baseline_kl = _mean_kl(request.getfixturevalue(baseline))
    assert kl < fraction * baseline_kl, f"{artifact}: KL {kl:.3g} = {kl / baseline_kl:.2f}x {baseline}'s"
