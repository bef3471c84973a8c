"""Perplexity and size of fp / RTN / AWQ / GPTQ / NF4 / QAT on SmolLM2-135M-Instruct (quant environment).

Usage: .venv/quant/bin/python bench/quant_quality.py [--model DIR] [--work DIR] [--num-samples N] ...
Every row is a real artifact made by `quantize.api` and evaluated on the same held-out text (the built-in
corpus' held-out split); the manifest's quality figures are printed, never recomputed or guessed.
The QAT row is `train qat` (train.qat, the command's own code) with the recipe train/recipes/qat.yaml, this
script's group size and evaluation; it trains on the built-in training split, so it takes far longer.
Note: the default model's weights were Q4_1 (4-bit) in its GGUF before expansion to bf16, so the
quantization loss measured on it is smaller than on a model trained at full precision.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from core.artifact import Manifest, read_manifest
from core.quality import EvalConfig
from quantize import api
from quantize.config import AwqConfig, CalibrationConfig, GptqConfig, Nf4Config, RtnConfig

REPO_ROOT = Path(__file__).resolve().parent.parent


def _qat(model: Path, out: Path, args: argparse.Namespace, eval_config: EvalConfig) -> Manifest:
    """A `train qat` artifact at this script's group size, evaluated as the other rows are."""
    from core.config import validate_config
    from core.textdata import BUILTIN_CORPUS
    from train.config import recipe_mapping
    from train.qat import QatRecipe, train_qat

    settings = recipe_mapping(args.qat_recipe)
    settings.setdefault("qat", {})["group_size"] = args.group_size
    settings["evaluation"] = eval_config.model_dump()
    loop = settings.setdefault("loop", {})
    loop["progress"] = False
    if args.qat_steps is not None:
        loop["max_steps"] = args.qat_steps
    recipe = validate_config(QatRecipe, settings, context=f"recipe {args.qat_recipe}")
    train_qat(model, BUILTIN_CORPUS, out, recipe, overwrite=True)
    return read_manifest(out)


def _size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", type=Path, default=None, help="default: the converted SmolLM2-135M-Instruct"
    )
    parser.add_argument("--work", type=Path, default=None, help="where artifacts go (default: a temp folder)")
    parser.add_argument("--num-samples", type=int, default=64, help="calibration samples")
    parser.add_argument("--max-seq-len", type=int, default=256, help="calibration tokens per sample")
    parser.add_argument("--eval-samples", type=int, default=64)
    parser.add_argument("--eval-seq-len", type=int, default=256)
    parser.add_argument("--group-size", type=int, default=64, help="64 divides SmolLM2's widths (576, 1536)")
    parser.add_argument("--n-grid", type=int, default=20, help="AWQ scale-search grid points")
    parser.add_argument(
        "--methods", default="RTN,GPTQ,AWQ,NF4,QAT", help="comma-separated subset, run in order"
    )
    parser.add_argument("--qat-recipe", type=Path, default=REPO_ROOT / "train" / "recipes" / "qat.yaml")
    parser.add_argument("--qat-steps", type=int, default=None, help="override the QAT recipe's max_steps")
    args = parser.parse_args()

    if args.model is None:
        from core.default_model import ensure_default_model

        args.model = ensure_default_model()
    work = args.work or Path(tempfile.mkdtemp(prefix="quant-bench-"))
    calibration = CalibrationConfig(num_samples=args.num_samples, max_seq_len=args.max_seq_len)
    eval_config = EvalConfig(eval_samples=args.eval_samples, eval_seq_len=args.eval_seq_len)
    group = args.group_size
    configs = {
        "RTN": RtnConfig(group_size=group),
        "AWQ": AwqConfig(group_size=group, n_grid=args.n_grid, calibration=calibration),
        "GPTQ": GptqConfig(group_size=group, calibration=calibration),
        "NF4": Nf4Config(),
    }
    print(f"model: {args.model}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    print(
        f"held-out: built-in held-out split, {args.eval_samples} samples x <= {args.eval_seq_len} tokens; "
        f"calibration: {args.num_samples} x <= {args.max_seq_len} tokens; W4 group size {group}; "
        f"AWQ grid {args.n_grid}"
    )
    print()
    print("| method | perplexity | mean KL vs fp | top-1 agreement | weights MB | time s |")
    print("|---|---:|---:|---:|---:|---:|")
    fp_size = sum(p.stat().st_size for p in args.model.glob("*.safetensors")) / 1e6
    for name in args.methods.split(","):
        start = time.perf_counter()
        if name == "QAT":
            manifest = _qat(args.model, work / "qat", args, eval_config)
        else:
            manifest = api.quantize(args.model, work / name.lower(), configs[name], eval_config=eval_config)
        seconds = time.perf_counter() - start
        q = manifest.quality
        if name == args.methods.split(",")[0]:
            print(f"| fp (bf16) | {q.perplexity_source:.3f} | 0 | 1 | {fp_size:.1f} | - |", flush=True)
        size = _size_mb(work / name.lower())
        print(
            f"| {name} | {q.perplexity:.3f} | {q.mean_kl:.4f} | {q.top1_agreement:.3f} | {size:.1f} "
            f"| {seconds:.0f} |",
            flush=True,
        )
        if name == "QAT":  # its own starting point, exported by train qat: round-to-nearest, same grid
            x = q.extra
            print(
                f"| QAT start (RTN) | {x['rtn_perplexity']:.3f} | {x['rtn_mean_kl']:.4f} "
                f"| {x['rtn_top1_agreement']:.3f} | {size:.1f} | - |",
                flush=True,
            )


if __name__ == "__main__":
    main()
