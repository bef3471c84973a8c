"""vLLM's CPU LoRA op (`bgmv_shrink` + `bgmv_expand`, PyTorch) against one plain matmul per op and against the
base linear layer it rides on, for one adapter, by number of tokens. Prints milliseconds; asserts nothing.

vLLM's op gathers a copy of the adapter matrix for every token (`weights[indices]`) and then runs one small
matrix-vector product per token; when every token uses the same adapter, one matmul per op does the same
arithmetic. See docs/BENCHMARKS.md (Multi-LoRA).

Usage: python -m bench.lora_ops_bench [--hidden 576] [--out 1536] [--rank 8] [--slots 8]
       [--tokens 16 256 1024]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any


def per_call_ms(fn: Callable[[], Any], repeat: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return 1000 * (time.perf_counter() - start) / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=576, help="input size (SmolLM2-135M: 576)")
    parser.add_argument("--out", type=int, default=1536, help="output size (SmolLM2-135M MLP: 1536)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--slots", type=int, default=8, help="adapter slots (--max-loras)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 256, 1024])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (vLLM's engine uses 1 here)")
    args = parser.parse_args()

    import torch
    from vllm.lora.ops.torch_ops import lora_ops

    torch.set_num_threads(args.threads)
    # vLLM's own ops, without this project's plugin wrapper if it is installed in this process.
    shrink = getattr(lora_ops.bgmv_shrink, "__wrapped__", lora_ops.bgmv_shrink)
    expand = getattr(lora_ops.bgmv_expand, "__wrapped__", lora_ops.bgmv_expand)
    dtype = torch.bfloat16
    lora_a = torch.randn(args.slots, 1, args.rank, args.hidden, dtype=dtype)
    lora_b = torch.randn(args.slots, 1, args.out, args.rank, dtype=dtype)
    base = torch.randn(args.out, args.hidden, dtype=dtype)
    print(
        f"bf16, hidden {args.hidden} -> out {args.out}, rank {args.rank}, {args.slots} slots, one adapter, "
        f"{args.threads} thread(s); ms per call"
    )
    print(f"{'tokens':>7}{'vLLM bgmv shrink+expand':>25}{'one matmul per op':>19}{'base linear':>13}")

    def timings(tokens: int) -> list[float]:
        x = torch.randn(tokens, args.hidden, dtype=dtype)
        indices = torch.zeros(tokens, dtype=torch.long)
        buffer = torch.zeros(tokens, args.rank)  # float32, as vLLM's PunicaWrapperCPU allocates it
        y = torch.zeros(tokens, args.out, dtype=dtype)

        def vllm_op() -> None:
            shrink(x, lora_a, buffer, indices, 1.0)
            expand(buffer, lora_b, y, indices, True)

        def matmul() -> None:
            shrunk = x.float() @ lora_a[0, 0].float().T
            y.add_(shrunk.to(dtype) @ lora_b[0, 0].T)

        return [per_call_ms(f, args.repeat) for f in (vllm_op, matmul, lambda: x @ base.T)]

    for tokens in args.tokens:
        ms = timings(tokens)
        print(f"{tokens:>7}{ms[0]:>25.2f}{ms[1]:>19.2f}{ms[2]:>13.2f}")


if __name__ == "__main__":
    main()
