"""`serve.vllm_plugin.punica_cpu`: the grouped CPU punica wrapper against an independent float64 reference and
against vLLM's own CPU wrapper, op by op.

Tolerances: float32 models, `rtol=1e-5, atol=1e-5` (deltas are O(0.1-1); the grouped ops only change the
summation order); bfloat16 models, one bfloat16 rounding of the output (`rtol=2**-7, atol=1e-2` on values of
O(1)), since the float32 delta is added in the output's dtype. Rows whose index is -1 must be bit-identical to
their input.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

punica_cpu = pytest.importorskip("serve.vllm_plugin.punica_cpu")
from vllm.lora.layers import LoRAMapping  # noqa: E402
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU  # noqa: E402

Grouped = punica_cpu.PunicaWrapperCPUGrouped
# Slot 1 is empty; ids are the registry's (never reused, so not 1..N).
LORA_INDEX_TO_ID: list[int | None] = [11, None, 7, 3]
SLOT_OF = {11: 0, 7: 2, 3: 3, 0: -1}
HIDDEN, RANK = 64, 8
TOLERANCE = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.bfloat16: {"rtol": 2**-7, "atol": 1e-2}}

# Per-token LoRA ids of the batches under test (0: no adapter).
BATCHES = {
    "runs of requests, mixed": [11] * 5 + [0] * 3 + [7] * 4 + [3] * 2 + [0],
    "interleaved decode tokens": [7, 0, 11, 3, 7, 11, 0, 3, 3, 11],
    "one adapter over the whole batch": [3] * 9,
    "one adapter, out of slot order with base rows": [0, 3, 3, 0, 3],
    "no adapter at all": [0] * 6,
    "a single token": [7],
    "a single base token": [0],
}


@dataclass
class Layer:
    """A LoRA-wrapped linear layer's stacked weights: `(slots, 1, rank, in)` and `(slots, 1, out_i, rank)`."""

    lora_a: tuple[torch.Tensor, ...]
    lora_b: tuple[torch.Tensor, ...]
    slices: tuple[int, ...]


def make_layer(slices: tuple[int, ...], dtype: torch.dtype, seed: int, rank_of_slot3: int = RANK) -> Layer:
    """Random adapters in slots 0, 2, 3 (slot 1 empty: zeros, as vLLM leaves it); slot 3's adapter has rank
    `rank_of_slot3`, zero-padded to the maximum rank as vLLM stores it."""
    gen = torch.Generator().manual_seed(seed)
    lora_a, lora_b = [], []
    for size in slices:
        a = torch.randn(4, 1, RANK, HIDDEN, generator=gen) * 0.1
        b = torch.randn(4, 1, size, RANK, generator=gen) * 0.1
        a[1], b[1] = 0, 0
        a[3, :, rank_of_slot3:], b[3, :, :, rank_of_slot3:] = 0, 0
        lora_a.append(a.to(dtype))
        lora_b.append(b.to(dtype))
    return Layer(tuple(lora_a), tuple(lora_b), slices)


def wrappers(token_ids: list[int], prompt_ids: list[int] | None = None) -> tuple[Grouped, PunicaWrapperCPU]:
    mapping = LoRAMapping(tuple(token_ids), tuple(prompt_ids or token_ids), is_prefill=True)
    grouped, upstream = Grouped(64, 16, "cpu"), PunicaWrapperCPU(64, 16, "cpu")
    for wrapper in (grouped, upstream):
        wrapper.update_metadata(mapping, LORA_INDEX_TO_ID, len(LORA_INDEX_TO_ID) + 1, 100)
    return grouped, upstream


def reference_linear(
    y: torch.Tensor, x: torch.Tensor, layer: Layer, ids: list[int], scale: float
) -> torch.Tensor:
    """Row by row in float64: y[i, slice] += (x[i] @ A[s].T * scale) @ B[s].T for s = slot of row i."""
    out = y.double().clone()
    for i, lora_id in enumerate(ids):
        slot = SLOT_OF[lora_id]
        if slot < 0:
            continue
        offset = 0
        for a, b, size in zip(layer.lora_a, layer.lora_b, layer.slices, strict=True):
            shrunk = x[i].double() @ a[slot, 0].double().T * scale
            out[i, offset : offset + size] += shrunk @ b[slot, 0].double().T
            offset += size
    return out


def assert_rows(got: torch.Tensor, start: torch.Tensor, expected: torch.Tensor, ids: list[int]) -> None:
    """Rows with an adapter equal `expected` within the dtype's tolerance; the others equal `start`
    exactly."""
    base = torch.tensor([i == 0 for i in ids])
    assert torch.equal(got[base], start[base])
    if (~base).any():
        torch.testing.assert_close(got[~base].double(), expected[~base], **TOLERANCE[got.dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "slices", [(48,), (64, 16, 16), (96, 96)], ids=["one slice", "packed qkv", "packed gate_up"]
)
@pytest.mark.parametrize("batch", list(BATCHES))
def test_add_lora_linear_equals_the_reference(
    batch: str, slices: tuple[int, ...], dtype: torch.dtype
) -> None:
    ids = BATCHES[batch]
    layer = make_layer(slices, dtype, seed=len(ids) + len(slices), rank_of_slot3=3)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(len(ids), HIDDEN, generator=gen).to(dtype)
    start = torch.randn(len(ids), sum(slices), generator=gen).to(dtype)
    y = start.clone()
    grouped, upstream = wrappers(ids)
    grouped.add_lora_linear(y, x, layer.lora_a, layer.lora_b, 0.5, slices)
    assert_rows(y, start, reference_linear(start, x, layer, ids, 0.5), ids)

    # vLLM's own op agrees on the rows with an adapter (its index -1 rows are the upstream bug).
    theirs = start.clone()
    upstream.add_lora_linear(theirs, x, layer.lora_a, layer.lora_b, 0.5, slices)
    with_adapter = torch.tensor([i != 0 for i in ids])
    torch.testing.assert_close(y[with_adapter], theirs[with_adapter], **TOLERANCE[dtype])


def test_the_batches_take_every_path_of_add_lora_linear() -> None:
    """Padded batched matmul, per-slot matmuls with a scatter, per-slot in-place expand: each is tested
    above."""
    groups = [punica_cpu.SlotGroups.of(np.array([SLOT_OF[i] for i in ids]), 4) for ids in BATCHES.values()]
    assert any(g.padded is not None for g in groups)
    assert any(g.padded is None and g.rows is not None for g in groups)
    assert any(g.padded is None and g.rows is None and g.count for g in groups)


def test_the_reference_can_fail() -> None:
    """A wrong slot, or the upstream leak into a base row, is caught by the comparison above."""
    ids = BATCHES["runs of requests, mixed"]
    layer = make_layer((48,), torch.float32, seed=0)
    x, start = torch.randn(len(ids), HIDDEN), torch.randn(len(ids), 48)
    _, upstream = wrappers(ids)
    leaked = start.clone()
    upstream.add_lora_linear(leaked, x, layer.lora_a, layer.lora_b, 1.0, (48,))
    with pytest.raises(AssertionError):
        assert_rows(leaked, start, reference_linear(start, x, layer, ids, 1.0), ids)
    swapped = [7 if i == 11 else 11 if i == 7 else i for i in ids]
    grouped, _ = wrappers(swapped)
    wrong = start.clone()
    grouped.add_lora_linear(wrong, x, layer.lora_a, layer.lora_b, 1.0, (48,))
    with pytest.raises(AssertionError):
        assert_rows(wrong, start, reference_linear(start, x, layer, ids, 1.0), ids)


def test_metadata_matches_vllms_convert_mapping() -> None:
    ids = BATCHES["runs of requests, mixed"]
    prompts = [11, 0, 7, 3, 0]  # one sampled row per request
    grouped, upstream = wrappers(ids, prompts)
    for name in ("token_lora_indices", "sampler_indices", "sampler_indices_padded"):
        assert torch.equal(getattr(grouped, name), getattr(upstream, name)), name
    assert grouped.indices_len == upstream.indices_len
    assert torch.equal(grouped._embeddings_indices[: len(ids)], upstream._embeddings_indices[: len(ids)])


def test_groups_sort_rows_by_slot_and_skip_base_rows() -> None:
    groups = punica_cpu.SlotGroups.of(np.array([2, -1, 0, 3, 2, 0, -1]), 4)
    assert groups.rows is not None and groups.rows.tolist() == [2, 5, 0, 4, 3]
    assert groups.runs == ((0, 0, 2), (2, 2, 4), (3, 4, 5))
    assert (groups.count, groups.size) == (5, 7)
    # Three runs of at most 2 rows in 4 slots: padded to width 2 (8 rows for 5).
    assert groups.padded is not None and groups.padded.width == 2
    assert groups.padded.valid.tolist() == [0, 1, 4, 5, 6]
    assert groups.padded.index[groups.padded.valid].tolist() == [2, 5, 0, 4, 3]
    in_order = punica_cpu.SlotGroups.of(np.array([0, 0, 2, 3]), 4)
    assert in_order.rows is None and in_order.runs == ((0, 0, 2), (2, 2, 3), (3, 3, 4))
    long_run = punica_cpu.SlotGroups.of(np.array([0] * 30 + [2, 3]), 4)  # a prefill and two decodes
    assert long_run.padded is None
    assert punica_cpu.SlotGroups.of(np.array([-1, -1]), 4).runs == ()


def test_packed_weights_follow_adapters_written_in_place() -> None:
    """vLLM activates an adapter by copying it into a slot of the stacked tensors: the packed copy must
    notice (their version counters), or a swapped-in adapter would be served with the old one's weights."""
    ids = [7, 7, 11]
    layer = make_layer((64, 16, 16), torch.float32, seed=6)
    x, start = torch.randn(3, HIDDEN), torch.randn(3, 96)
    grouped, _ = wrappers(ids)
    grouped.add_lora_linear(start.clone(), x, layer.lora_a, layer.lora_b, 1.0, layer.slices)
    for a, b in zip(layer.lora_a, layer.lora_b, strict=True):  # as LoRA layers' set_lora does
        a[2, 0].copy_(torch.randn(RANK, HIDDEN) * 0.1)
        b[2] = 0
        b[2, 0, :, :3].copy_(torch.randn(b.shape[2], 3) * 0.1)
    y = start.clone()
    grouped.add_lora_linear(y, x, layer.lora_a, layer.lora_b, 1.0, layer.slices)
    assert_rows(y, start, reference_linear(start, x, layer, ids, 1.0), ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_logits_follow_the_sampled_rows(dtype: torch.dtype) -> None:
    """Prefill: one sampled row per request, so the logits' groups differ from the tokens'. The adapter's
    vocabulary is padded past the logits' (the upstream op keeps the common part)."""
    tokens = [11] * 4 + [0] * 3 + [7] * 2
    sampled = [11, 0, 7]
    gen = torch.Generator().manual_seed(2)
    a = (torch.randn(4, 1, RANK, HIDDEN, generator=gen) * 0.1).to(dtype)
    b = (torch.randn(4, 1, 40, RANK, generator=gen) * 0.1).to(dtype)
    x = torch.randn(len(sampled), HIDDEN, generator=gen).to(dtype)
    start = torch.randn(len(sampled), 32, generator=gen).to(dtype)
    grouped, upstream = wrappers(tokens, sampled)
    y = start.clone()
    grouped.add_lora_logits(y, x, a, b, 1.0)
    layer = Layer((a,), (b[:, :, :32],), (32,))
    assert_rows(y, start, reference_linear(start, x, layer, sampled, 1.0), sampled)
    theirs = start.clone()
    upstream.add_lora_logits(theirs, x, a, b, 1.0)
    torch.testing.assert_close(y[[0, 2]], theirs[[0, 2]], **TOLERANCE[dtype])


def test_embedding_adds_only_to_tokens_with_an_adapter() -> None:
    ids = BATCHES["interleaved decode tokens"]
    gen = torch.Generator().manual_seed(3)
    b = torch.randn(4, 1, HIDDEN, RANK, generator=gen)
    x = torch.randn(
        len(ids), RANK, generator=gen
    )  # each token's row of its slot's A (slot 0's for base rows)
    start = torch.randn(len(ids), HIDDEN, generator=gen)
    grouped, _ = wrappers(ids)
    y = start.clone()
    grouped.add_lora_embedding(y, x, b, add_input=True)  # vLLM's embedding layer passes this spelling
    expected = start.double().clone()
    for i, lora_id in enumerate(ids):
        if SLOT_OF[lora_id] >= 0:
            expected[i] += x[i].double() @ b[SLOT_OF[lora_id], 0].double().T
    assert_rows(y, start, expected, ids)


def test_fully_sharded_shrink_then_expand_equals_add_lora_linear() -> None:
    """vLLM's fully sharded layers call add_shrink into a (slices, tokens, rank) float32 buffer, all-gather
    it, then add_expand: the two halves compose to add_lora_linear."""
    ids = BATCHES["interleaved decode tokens"]
    layer = make_layer((64, 16, 16), torch.float32, seed=4)
    x, start = torch.randn(len(ids), HIDDEN), torch.randn(len(ids), 96)
    grouped, _ = wrappers(ids)
    buffers = torch.full((3, len(ids), RANK), 5.0)  # stale values: shrink must overwrite every row
    grouped.add_shrink(buffers, x, layer.lora_a, 0.5)
    base = torch.tensor([i == 0 for i in ids])
    assert torch.equal(buffers[:, base], torch.zeros_like(buffers[:, base]))
    y = start.clone()
    grouped.add_expand(y, buffers, layer.lora_b, layer.slices, offset_start=0, add_inputs=True)
    assert_rows(y, start, reference_linear(start, x, layer, ids, 0.5), ids)
    assigned = start.clone()
    grouped.add_expand(assigned, buffers, layer.lora_b, layer.slices, add_inputs=False)
    assert torch.equal(assigned[base], torch.zeros_like(assigned[base]))
    torch.testing.assert_close(assigned[~base], y[~base] - start[~base], rtol=1e-5, atol=1e-5)


def test_full_linear_replaces_the_head_only_for_rows_whose_adapter_has_one() -> None:
    sampled = [3, 0, 11, 7]
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(4, 1, 6, HIDDEN, generator=gen)
    bias = torch.randn(4, 6, generator=gen)
    enabled = torch.tensor([True, False, False, True])  # slots 0 and 3 ship their own head
    x, start = torch.randn(4, HIDDEN, generator=gen), torch.randn(4, 6, generator=gen)
    grouped, upstream = wrappers(sampled, sampled)
    y, theirs = start.clone(), start.clone()
    grouped.apply_lora_full_linear(y, x, weight, bias, enabled)
    upstream.apply_lora_full_linear(theirs, x, weight, bias, enabled)
    torch.testing.assert_close(y, theirs, rtol=1e-5, atol=1e-5)
    assert torch.equal(y[[1, 3]], start[[1, 3]])  # the base row, and slot 2's (no head of its own): unchanged
    for row, slot in ((0, 3), (2, 0)):
        torch.testing.assert_close(y[row], x[row] @ weight[slot, 0].T + bias[slot], rtol=1e-5, atol=1e-5)


def test_install_points_vllms_cpu_platform_at_the_grouped_wrapper(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.lora.punica_wrapper.punica_selector import get_punica_wrapper
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("the grouped wrapper is for vLLM's CPU platform")
    monkeypatch.setattr(
        type(current_platform), "get_punica_wrapper", type(current_platform).get_punica_wrapper
    )
    assert punica_cpu.install()
    assert punica_cpu.install()  # idempotent
    assert isinstance(get_punica_wrapper(64, 16, "cpu"), Grouped)
