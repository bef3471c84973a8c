"""Multi-LoRA on CPU, grouped by adapter slot (a fix of the vLLM plugin, see serve/vllm_plugin/__init__.py).

vLLM's CPU punica wrapper (`vllm/lora/punica_wrapper/punica_cpu.py` over `vllm/lora/ops/torch_ops/`) applies
LoRA token by token: `sgmv_*` expands the batch's runs into one slot index per token, then `bgmv_*` gathers a
private copy of the adapter matrix for every token (`weights[indices]`, T x out x rank elements) and runs T
matrix-vector products. On CPU that is 50-76% of the engine's time at LoRA steps (docs/BENCHMARKS.md), and a
token without an adapter (index -1) silently gets the last slot's adapter (vllm-project/vllm#48421).

`PunicaWrapperCPUGrouped` replaces it. Once per step (`update_metadata`) it sorts the tokens by adapter slot
into runs; then a LoRA linear layer is, per slot in use, one float32 matmul shrinking all of the layer's
slices and one expanding them all (its stacked weights packed once in float32, `PackedWeights`), the
expand accumulating straight into the output where the rows are already in slot order, else one scatter-add
into the rows that have an adapter. Many short runs (decode steps of mixed traffic) are padded to one
batched matmul over all slots instead (`PaddedRuns`). Embeddings, logits and classification heads use the
same runs. Invariants:
- a row whose index is -1 is never read nor written by any op: its output is exactly the base model's;
- the adapter arithmetic runs in float32 whatever the model's dtype (CPUs without native bf16 emulate bf16
  matmuls ~10-90x slower; on the others it costs little), and the result is added in the output's dtype, as
  vLLM's ops do;
- a step in which no token has an adapter costs one Python call per LoRA layer and nothing else.
Results equal vLLM's ops up to floating-point summation order (tests/unit/serve/test_vllm_plugin_punica_cpu.py
states the tolerances).

It is installed by pointing vLLM's CPU platform at it (`CpuPlatform.get_punica_wrapper`), in every vLLM
process. Upstream would make it unnecessary with a grouped CPU path in `PunicaWrapperCPU` (tokens sorted by
slot once per step in `update_metadata`, one GEMM per slot in use instead of a weight gather per token, rows
with index -1 skipped, float32 arithmetic for bf16 models on CPUs without native bf16), the CPU counterpart of
the Triton kernels' per-slot tiling: remove this module once the installed vLLM has one and
tests/e2e/test_lora_cpu_leak.py passes with vLLM's own wrapper.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from vllm.lora.punica_wrapper.punica_base import PunicaWrapperBase

if TYPE_CHECKING:
    from vllm.lora.layers import LoRAMapping

log = logging.getLogger(__name__)

QUALNAME = f"{__name__}.PunicaWrapperCPUGrouped"


@dataclass(frozen=True)
class PaddedRuns:
    """Every slot's run padded to the longest one, for one batched matmul over all slots (many short runs:
    decode steps of mixed traffic). Slot s's rows are `index[s * width : s * width + n_s]` (rows of the
    layer's input; the padding repeats row 0: computed, never read); `valid` picks the real ones back, in
    group order.
    """

    index: torch.Tensor
    valid: torch.Tensor
    width: int

    # Padded when this many runs or more share a step and the padding at most this factor of the real rows:
    # then 4 torch ops per layer beat 2 matmuls per run (bench/lora_ops_bench.py, "mixed decode tokens").
    MIN_RUNS = 3
    MAX_WASTE = 2

    @classmethod
    def of(
        cls, slots: np.ndarray, order: np.ndarray, counts: np.ndarray, num_slots: int
    ) -> PaddedRuns | None:
        """`order`: the rows with an adapter in group order; `counts`: rows per slot."""
        width = int(counts.max(initial=0))
        if np.count_nonzero(counts) < cls.MIN_RUNS or num_slots * width > cls.MAX_WASTE * order.size:
            return None
        sorted_slots = slots[order]
        run_start = np.cumsum(counts) - counts
        valid = sorted_slots * width + np.arange(order.size) - run_start[sorted_slots]
        index = np.zeros(num_slots * width, dtype=np.int64)
        index[valid] = order
        return cls(torch.from_numpy(index), torch.from_numpy(valid.astype(np.int64)), width)


@dataclass(frozen=True)
class SlotGroups:
    """The rows of one index vector (one slot index per row, -1: no adapter), grouped by slot.

    `rows` holds the positions of the rows that have an adapter, sorted by slot (stable), or is None when that
    is every row in order (no gather or scatter needed); `runs` lists `(slot, start, end)` for every slot in
    use, `start:end` being its rows in that order; `padded` is the same runs laid out for a batched matmul,
    where that pays; `count` is the number of rows with an adapter, `size` the number of rows.
    """

    rows: torch.Tensor | None
    runs: tuple[tuple[int, int, int], ...]
    padded: PaddedRuns | None
    count: int
    size: int

    @classmethod
    def of(cls, slots: np.ndarray, num_slots: int) -> SlotGroups:
        has_adapter = slots >= 0
        count = int(has_adapter.sum())
        counts = np.bincount(slots[has_adapter], minlength=num_slots)
        ends = np.cumsum(counts)
        runs = tuple((s, int(e - n), int(e)) for s, (n, e) in enumerate(zip(counts, ends, strict=True)) if n)
        if count == slots.size and bool(np.all(slots[1:] >= slots[:-1])):
            order, rows = np.arange(count), None
        else:
            order = np.argsort(slots, kind="stable")[slots.size - count :]  # -1 sorts first: drop those
            rows = torch.from_numpy(order.astype(np.int64))
        return cls(rows, runs, PaddedRuns.of(slots, order, counts, num_slots), count, slots.size)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """The rows of `x` that have an adapter, in group order, as float32."""
        picked = x[: self.size] if self.rows is None else x.index_select(0, self.rows)
        return picked.float()

    def add_to(self, y: torch.Tensor, values: torch.Tensor) -> None:
        """`y[rows] += values`, the float32 sum rounded once to `y`'s dtype (whichever path a batch takes, so
        a row's result does not depend on its batch); rows without an adapter are not touched."""
        if self.rows is None:
            y[: self.size].add_(values)
        elif y.dtype == values.dtype:
            y.index_add_(0, self.rows, values)
        else:
            y.index_copy_(0, self.rows, y.index_select(0, self.rows).float().add_(values).to(y.dtype))

    def matmul(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Row i of the gathered, float32 `x` times `weights[slot(i)]`, `weights` being `(slots, in, out)`
        (any dtype, any strides): one float32 matmul per slot in use; the result is `(count, out)`."""
        out = torch.empty((x.shape[0], weights.shape[2]), dtype=torch.float32, device=x.device)
        for slot, start, end in self.runs:
            torch.mm(x[start:end], weights[slot].float(), out=out[start:end])
        return out


def in_out(stacked: torch.Tensor) -> torch.Tensor:
    """vLLM's stacked adapter weights, `(slots, 1, out, in)` or `(slots, out, in)`, as a `(slots, in, out)`
    view."""
    return (stacked.squeeze(1) if stacked.ndim == 4 else stacked).transpose(1, 2)


@dataclass(frozen=True)
class PackedWeights:
    """One LoRA linear layer's stacked weights in float32, laid out `(slots, in, out)` for matmuls.

    `a` is `(slots, in, sum of ranks)`: the slices' A side by side, so one matmul shrinks every slice; `b` is
    `(slots, sum of ranks, output width)`: the slices' B on the block diagonal (zeros elsewhere), so one
    matmul expands every slice into its columns of the output. The zeros cost rank x out MACs per extra
    slice, far less than the per-slice matmuls and concatenation they replace: on CPU these tiny matmuls
    are bound by the cost of a torch call, not by arithmetic (docs/BENCHMARKS.md, multi-LoRA profile).
    `versions` are the stacked tensors' version counters when packed: vLLM writes adapters into them in
    place (`set_lora`, `reset_lora`), which bumps them.
    """

    lora_a: tuple[torch.Tensor, ...]
    versions: tuple[int, ...]
    a: torch.Tensor
    b: torch.Tensor

    @classmethod
    def of(
        cls,
        lora_a: tuple[torch.Tensor, ...],
        lora_b: tuple[torch.Tensor, ...],
        output_slices: tuple[int, ...],
        width: int,
    ) -> PackedWeights:
        """`width`: the output's columns (the slices' sizes add up to at most that)."""
        versions = tuple(t._version for t in (*lora_a, *lora_b))
        a = torch.cat([in_out(t).float() for t in lora_a], dim=2).contiguous()
        ranks = [t.shape[-2] for t in lora_a]
        b = torch.zeros((a.shape[0], sum(ranks), width), dtype=torch.float32)
        rank_at = size_at = 0
        for t, rank, size in zip(lora_b, ranks, output_slices, strict=True):
            b[:, rank_at : rank_at + rank, size_at : size_at + size] = in_out(t)[:, :rank, :size]
            rank_at, size_at = rank_at + rank, size_at + size
        return cls(lora_a, versions, a, b)

    def current(self, lora_a: tuple[torch.Tensor, ...], lora_b: tuple[torch.Tensor, ...]) -> bool:
        return self.lora_a is lora_a and self.versions == tuple(t._version for t in (*lora_a, *lora_b))


def slots_of(lora_ids: tuple[int, ...] | list[int], lora_index_to_id: list[int | None]) -> np.ndarray:
    """The slot index of each LoRA id (-1 for 0, no adapter), vectorised: a Python loop over distinct ids
    only."""
    ids = np.asarray(lora_ids, dtype=np.int64)
    if ids.size == 0:
        return ids
    slot_of_id = {lora_id: slot for slot, lora_id in enumerate(lora_index_to_id) if lora_id is not None}
    distinct, inverse = np.unique(ids, return_inverse=True)
    table = np.array([slot_of_id[int(i)] if i > 0 else -1 for i in distinct], dtype=np.int64)
    return table[inverse.reshape(-1)]


class PunicaWrapperCPUGrouped(PunicaWrapperBase):
    """vLLM's punica interface on CPU with grouped float32 ops (module docstring)."""

    def __init__(
        self, max_num_batched_tokens: int, max_batches: int, device: torch.device | str, **kwargs: Any
    ):
        super().__init__(max_num_batched_tokens, max_batches, device)
        empty = SlotGroups(None, (), None, 0, 0)
        self._tokens = empty  # grouping of the step's tokens (linear layers, embeddings)
        self._sampled = empty  # grouping of the step's sampled rows (logits, classification heads)
        self._packed: dict[int, PackedWeights] = {}  # per LoRA linear layer, by id of its lora_a_stacked

    def update_metadata(
        self,
        mapping: LoRAMapping,
        lora_index_to_id: list[int | None],
        max_loras: int,
        vocab_size: int,
        **kwargs: Any,
    ) -> None:
        """The step's groups, plus the index tensors of `PunicaWrapperBase` that vLLM's layers read
        (`_embeddings_indices`) or that it documents, as upstream's `convert_mapping` builds them."""
        num_slots = len(lora_index_to_id)
        token_slots = slots_of(mapping.index_mapping, lora_index_to_id)
        sampled_slots = slots_of(mapping.prompt_mapping, lora_index_to_id)
        self._tokens = SlotGroups.of(token_slots, num_slots)
        self._sampled = SlotGroups.of(sampled_slots, num_slots)

        tokens, sampled = token_slots.size, sampled_slots.size
        self._token_lora_indices[:tokens].copy_(torch.from_numpy(token_slots))
        self._embeddings_indices[:tokens].copy_(torch.from_numpy(np.maximum(token_slots, 0) * vocab_size))
        self._sampler_indices[:sampled].copy_(torch.from_numpy(sampled_slots))
        padded = np.where(sampled_slots < 0, max_loras - 1, sampled_slots)
        self._sampler_indices_padded[:sampled].copy_(torch.from_numpy(np.arange(sampled) + padded * sampled))
        self.indices_len[:] = [tokens, sampled, sampled, tokens]
        self.is_prefill = mapping.is_prefill
        self.no_lora = self._tokens.count == 0

    # --- linear layers ----------------------------------------------------------------------------------
    def add_lora_linear(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_a_stacked: tuple[torch.Tensor, ...],
        lora_b_stacked: tuple[torch.Tensor, ...],
        scale: float,
        output_slices: tuple[int, ...],
        *,
        buffer: tuple[torch.Tensor, ...] | None = None,
        **kwargs: Any,
    ) -> None:
        """`y[:, slice i] += (x @ A_i[slot].T * scale) @ B_i[slot].T` for rows with an adapter (`buffer`, the
        caller's scratch space for the shrunk rows, is not needed)."""
        groups = self._tokens
        if groups.count == 0:
            return
        packed = self._packed.get(id(lora_a_stacked))
        if packed is None or not packed.current(lora_a_stacked, lora_b_stacked):
            packed = self._packed[id(lora_a_stacked)] = PackedWeights.of(
                lora_a_stacked, lora_b_stacked, output_slices, y.shape[-1]
            )
        y, x = y.view(-1, y.shape[-1]), x.view(-1, x.shape[-1])
        if groups.padded is not None:
            padded = groups.padded
            rows = x.index_select(0, padded.index).float().view(packed.a.shape[0], padded.width, -1)
            shrunk = torch.bmm(rows, packed.a)
            if scale != 1.0:
                shrunk.mul_(scale)
            delta = torch.bmm(shrunk, packed.b).view(-1, y.shape[1])
            groups.add_to(y, delta.index_select(0, padded.valid))
            return
        shrunk = groups.matmul(groups.gather(x), packed.a)
        if scale != 1.0:
            shrunk.mul_(scale)
        in_place = groups.rows is None and y.dtype == torch.float32
        delta = (
            y if in_place else torch.zeros((groups.count, y.shape[1]), dtype=torch.float32, device=y.device)
        )
        for slot, start, end in groups.runs:
            delta[start:end].addmm_(shrunk[start:end], packed.b[slot])
        if not in_place:
            groups.add_to(y, delta)

    def add_shrink(
        self,
        y: tuple[torch.Tensor, ...] | torch.Tensor,
        x: torch.Tensor,
        lora_a_stacked: tuple[torch.Tensor, ...],
        scale: float,
        **kwargs: Any,
    ) -> None:
        """`y[i] = x @ A_i[slot].T * scale` per slice (float32 `y[i]`, one row per token); rows without an
        adapter get zeros. Used by vLLM's fully sharded LoRA layers, between shrink and an all-gather."""
        groups = self._tokens
        rows = groups.gather(x.view(-1, x.shape[-1])) if groups.count else None
        for i, lora_a in enumerate(lora_a_stacked):
            out = y[i].view(-1, y[i].shape[-1])
            out.zero_()
            if rows is not None:
                shrunk = groups.matmul(rows, in_out(lora_a)).mul_(scale)
                groups.add_to(out[:, : shrunk.shape[1]], shrunk)

    def add_expand(
        self,
        y: torch.Tensor,
        x: tuple[torch.Tensor, ...] | torch.Tensor,
        lora_b_stacked: tuple[torch.Tensor, ...],
        output_slices: tuple[int, ...],
        offset_start: int = 0,
        add_inputs: bool = True,
        **kwargs: Any,
    ) -> None:
        """`y[:, slice i] += x[i] @ B_i[slot].T` per slice (`=` when not `add_inputs`; rows without an adapter
        then get zeros), `x[i]` holding one row per token."""
        groups = self._tokens
        y = y.view(-1, y.shape[-1])
        offset = offset_start
        for i, (lora_b, size) in enumerate(zip(lora_b_stacked, output_slices, strict=True)):
            out = y[:, offset : offset + size]
            if not add_inputs:
                out.zero_()
            if groups.count:
                groups.add_to(out, groups.matmul(groups.gather(x[i]), in_out(lora_b)))
            offset += size

    # --- embeddings, logits, classification heads ---------------------------------------------------------
    def add_lora_embedding(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_b_stacked: torch.Tensor,
        add_inputs: bool = True,
        **kwargs: Any,
    ) -> None:
        """`y += x @ B[slot].T` for tokens with an adapter (`x`: each token's row of its slot's A)."""
        if not add_inputs:
            y.zero_()
        groups = self._tokens
        if groups.count:
            groups.add_to(y, groups.matmul(groups.gather(x), in_out(lora_b_stacked)))

    def add_lora_logits(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_a_stacked: torch.Tensor,
        lora_b_stacked: torch.Tensor,
        scale: float,
        *,
        buffer: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> None:
        """`y += (x @ A[slot].T * scale) @ B[slot].T` for sampled rows with an adapter; the vocabulary is the
        shorter of the logits' and the adapter's (either may be padded)."""
        groups = self._sampled
        if groups.count == 0:
            return
        y = y.view(-1, y.shape[-1])
        shrunk = groups.matmul(groups.gather(x.view(-1, x.shape[-1])), in_out(lora_a_stacked))
        if scale != 1.0:
            shrunk.mul_(scale)
        vocab = min(y.shape[1], lora_b_stacked.shape[-2])
        if vocab < lora_b_stacked.shape[-2]:
            lora_b_stacked = lora_b_stacked[..., :vocab, :]
        groups.add_to(y[:, :vocab], groups.matmul(shrunk, in_out(lora_b_stacked)))

    def apply_lora_full_linear(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        weight_stacked: torch.Tensor,
        bias_stacked: torch.Tensor,
        module_enabled: torch.Tensor,
    ) -> None:
        """A classification head replaced by an adapter's own (`modules_to_save`) for its sampled rows."""
        groups = self._sampled
        if groups.count == 0:
            return
        adapter_y = torch.zeros((x.size(0), weight_stacked.size(-2)), dtype=torch.float32, device=x.device)
        groups.add_to(adapter_y, groups.matmul(groups.gather(x), in_out(weight_stacked)))
        y.copy_(self._select_full_linear_output(y, adapter_y, bias_stacked, module_enabled))


def install() -> bool:
    """Make vLLM's CPU platform build `PunicaWrapperCPUGrouped` in this process. True if it is in place.

    Idempotent; does nothing off CPU.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    platform = type(current_platform)
    platform.get_punica_wrapper = classmethod(lambda cls: QUALNAME)  # type: ignore[method-assign,assignment]
    return True
