"""The LoRA ops of one decoder layer on CPU: vLLM's `PunicaWrapperCPU` against this project's grouped wrapper
(`serve.vllm_plugin.punica_cpu`), next to the base linear layers they ride on. Prints milliseconds; asserts
nothing.

One layer of the model's shapes (default SmolLM2-135M: hidden 576, q/k/v 576/192/192, MLP 1536) with its four
LoRA-wrapped linears (packed qkv, o, packed gate_up, down), every adapter slot filled. Each case times one
step's `update_metadata` plus the four `add_lora_linear` calls, for both wrappers, and the four base matmuls;
rounds interleave the contenders and the table gives the median (min..max) over rounds.

Usage: python -m bench.lora_ops_bench [--dtype float32 bfloat16] [--rank 8] [--slots 8] [--rounds 5]
       [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Case:
    name: str
    slots: list[int]  # the slot of each token, -1: no adapter


def cases(slots: int) -> list[Case]:
    return [
        Case("32 mixed decode tokens", [i % slots for i in range(32)]),
        Case("16 decode tokens, 1 adapter", [0] * 16),
        Case("16 decode tokens, no adapter", [-1] * 16),
        Case("one 512-token prefill", [0] * 512),
        Case(
            "4 prefills of 128, mixed + base", [0] * 128 + [-1] * 128 + [3 % slots] * 128 + [5 % slots] * 128
        ),
    ]


def per_call_ms(fn: Callable[[], Any], repeat: int) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return 1000 * (time.perf_counter() - start) / repeat


@dataclass(frozen=True)
class Layer:
    n_in: int
    slices: tuple[int, ...]
    lora_a: tuple[Any, ...]  # (slots, 1, rank, in) per slice
    lora_b: tuple[Any, ...]  # (slots, 1, out_i, rank) per slice
    weight: Any  # the base layer's (out, in)


def make_layers(
    shapes: dict[str, tuple[int, tuple[int, ...]]], slots: int, rank: int, dtype: Any
) -> dict[str, Layer]:
    """Random stacked adapters in every slot and a random base weight, per layer of `shapes` (name: (in,
    output slices))."""
    import torch

    gen = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> Any:
        return (torch.randn(*shape, generator=gen) * 0.1).to(dtype)

    return {
        name: Layer(
            n_in,
            outs,
            tuple(randn(slots, 1, rank, n_in) for _ in outs),
            tuple(randn(slots, 1, n, rank) for n in outs),
            randn(sum(outs), n_in),
        )
        for name, (n_in, outs) in shapes.items()
    }


def time_case(
    case: Case, layers: dict[str, Layer], args: argparse.Namespace, dtype: Any
) -> list[list[float]]:
    """ms per step of [vLLM's wrapper, the grouped wrapper, the base linears], one entry per round."""
    import torch
    from vllm.lora.layers import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    from serve.vllm_plugin.punica_cpu import PunicaWrapperCPUGrouped

    ids = list(range(101, 101 + args.slots))  # the LoRA ids of the slots
    tokens = len(case.slots)
    mapping = LoRAMapping(tuple(ids[s] if s >= 0 else 0 for s in case.slots), (0,), is_prefill=True)
    gen = torch.Generator().manual_seed(1)
    xs = {
        n: torch.randn(tokens, n, generator=gen).to(dtype) for n in {layer.n_in for layer in layers.values()}
    }
    ys = {name: torch.zeros(tokens, sum(layer.slices), dtype=dtype) for name, layer in layers.items()}

    def step(wrapper: Any) -> Callable[[], None]:
        def run() -> None:
            wrapper.update_metadata(mapping, ids, args.slots + 1, 49152)
            for name, layer in layers.items():
                wrapper.add_lora_linear(
                    ys[name], xs[layer.n_in], layer.lora_a, layer.lora_b, 1.0, layer.slices
                )

        return run

    def base() -> None:
        for layer in layers.values():
            torch.nn.functional.linear(xs[layer.n_in], layer.weight)

    contenders = [
        step(PunicaWrapperCPU(max(tokens, 2048), 256, "cpu")),
        step(PunicaWrapperCPUGrouped(max(tokens, 2048), 256, "cpu")),
        base,
    ]
    for fn in contenders:
        fn()  # warm-up
    times: list[list[float]] = [[] for _ in contenders]
    for _ in range(args.rounds):  # interleaved: drift hits every contender alike
        for i, fn in enumerate(contenders):
            times[i].append(per_call_ms(fn, args.repeat))
    return times


def cell(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}..{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--kv", type=int, default=192, help="k and v projection size")
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--slots", type=int, default=8, help="adapter slots (--max-loras)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=3, help="calls per timing")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    h, kv, mlp = args.hidden, args.kv, args.intermediate
    shapes = {"qkv": (h, (h, kv, kv)), "o": (h, (h,)), "gate_up": (h, (mlp, mlp)), "down": (mlp, (h,))}
    print(
        f"one decoder layer, hidden {h}, q/k/v {h}/{kv}/{kv}, MLP {mlp}, rank {args.rank}, {args.slots} "
        f"slots, {args.threads} thread(s), {args.rounds} rounds; ms per step: median (min..max); "
        f"ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', '(default)')}"
    )
    print(f"{'dtype':<9}{'case':<34}{'vLLM ops':>22}{'grouped':>22}{'speed-up':>10}{'base linears':>22}")
    for dtype_name in args.dtype:
        dtype = getattr(torch, dtype_name)
        layers = make_layers(shapes, args.slots, args.rank, dtype)
        for case in cases(args.slots):
            times = time_case(case, layers, args, dtype)
            speedup = statistics.median(times[0]) / statistics.median(times[1])
            print(
                f"{dtype_name:<9}{case.name:<34}{cell(times[0]):>22}{cell(times[1]):>22}{speedup:>9.1f}x"
                f"{cell(times[2]):>22}",
                flush=True,
            )


if __name__ == "__main__":
    main()
