"""The fast engine's ops over a packed buffer (heads of different lengths): each Triton kernel
against its torch twin, and each twin against the plain rule applied to every head's own slots.

Without a GPU the Triton side runs in Triton's interpreter (``tests/conftest.py`` turns it on).
"""

from __future__ import annotations

import pytest
import torch

from squeezekv.ops import common, decode, eviction, slots
from squeezekv.ops.decode import Segments

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
COLUMN = 5000


def packed_buffer(group: int, window: int | None, seed: int, dtype=torch.float32):
    """Three sequences of two key heads; each head's segment has its own length (one longer than a
    decode program's chunk, one of a single slot), slots in no order, some empty."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([[decode.DECODE_CHUNK + 45, 3], [1, 60], [200, 17]])
    batch, kv_heads, dim = lengths.shape[0], lengths.shape[1], 32
    total = int(lengths.sum())
    offsets = (lengths.flatten().cumsum(0) - lengths.flatten()).view_as(lengths)
    query = torch.randn(batch, kv_heads * group, 1, dim, generator=generator).to(dtype)
    key = torch.randn(total, dim, generator=generator).to(dtype)
    value = torch.randn(total, dim, generator=generator).to(dtype)
    positions = torch.randperm(COLUMN, generator=generator)[:total]
    valid = torch.rand(total, generator=generator) > 0.3
    own = offsets.flatten() + (lengths.flatten() - 1) // 2  # the query's own token, in every segment
    positions[own], valid[own] = COLUMN, True
    segments = Segments(offsets, lengths, int(lengths.max()))
    tensors = [t.to(DEVICE) for t in (query, key, value, positions, valid)]
    return tensors, Segments(*(t.to(DEVICE) for t in segments[:2]), segments.width), window


@pytest.mark.skipif(common.triton is None, reason="needs Triton")
@pytest.mark.parametrize(("group", "window"), [(1, None), (4, 300)])
def test_packed_decode_triton_matches_its_torch_twin(group, window):
    (query, key, value, positions, valid), segments, window = packed_buffer(group, window, seed=group)
    column = torch.tensor([COLUMN], device=DEVICE)
    arguments = (query, key, value, positions, valid, column, window, 0.2, False)
    want, _ = decode.decode_attention_torch(*arguments, segments=segments)
    got, mass = decode.decode_attention_triton(*arguments, segments=segments)
    assert mass is None
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_packed_decode_is_attention_over_each_heads_own_tokens():
    (query, key, value, positions, valid), segments, _ = packed_buffer(2, None, seed=7, dtype=torch.float64)
    column = torch.tensor([COLUMN], device=DEVICE)
    output, _ = decode.decode_attention(
        query, key, value, positions, valid, column, None, 0.2, False, segments=segments
    )
    for row in range(query.shape[0]):
        for head in range(query.shape[1]):
            kv_head = head // 2
            start, length = int(segments.offsets[row, kv_head]), int(segments.lengths[row, kv_head])
            held = torch.arange(start, start + length, device=DEVICE)[valid[start : start + length]]
            weights = torch.softmax(key[held] @ query[row, head, 0] * 0.2, dim=0)
            torch.testing.assert_close(output[row, head, 0], weights @ value[held])


def test_packed_decode_gives_no_mass():
    (query, key, value, positions, valid), segments, _ = packed_buffer(1, None, seed=1)
    with pytest.raises(ValueError, match="packed buffer gives no attention mass"):
        decode.decode_attention(
            query, key, value, positions, valid, torch.tensor([COLUMN]), None, 0.2, True, segments=segments
        )


def packed_rows(seed: int, keeps_newest: bool):
    """Bookkeeping of a packed buffer: segments of 5, 1300 (more than one block), 1, 40, 7 and 3
    slots; integer priorities (ties), some slots empty, budgets under and over what rows hold."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([[5, 1300], [1, 40], [7, 3]])
    flat = lengths.flatten()
    total = int(flat.sum())
    offsets = (flat.cumsum(0) - flat).view_as(lengths)
    priority = torch.randint(0, 4, (total,), generator=generator).float()
    positions = torch.cat([torch.randperm(2000, generator=generator)[:length] for length in flat.tolist()])
    valid = torch.rand(total, generator=generator) > 0.2
    held = torch.stack([part.sum() for part in valid.split(flat.tolist())])
    budget = (held - torch.randint(0, 2, flat.shape, generator=generator)).clamp(min=0).view_as(lengths)
    newest = torch.tensor([3, 0, 2]) if keeps_newest else None
    segments = Segments(offsets.to(DEVICE), lengths.to(DEVICE), int(lengths.max()))
    on_device = [t.to(DEVICE) for t in (priority, valid, positions, budget, torch.zeros_like(lengths))]
    extra = (torch.tensor([1990], device=DEVICE), None if newest is None else newest.to(DEVICE))
    return on_device, extra, segments


@pytest.mark.skipif(common.triton is None, reason="needs Triton")
@pytest.mark.parametrize("keeps_newest", [False, True])
def test_packed_eviction_triton_matches_its_torch_twin(keeps_newest):
    runs = []
    for evict in (eviction.evict_lowest_torch, eviction.evict_lowest_triton):
        (priority, valid, positions, budget, free), (column, newest), segments = packed_rows(3, keeps_newest)
        evict(priority, valid, positions, budget, free, column, newest, segments)
        runs.append((valid, free))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_packed_eviction_is_the_plain_rule_per_head():
    (priority, valid, positions, budget, free), (column, newest), segments = packed_rows(4, True)
    expected_valid, expected_free = valid.clone(), free.clone()
    for row in range(3):
        for head in range(2):
            start, length = int(segments.offsets[row, head]), int(segments.lengths[row, head])
            part = slice(start, start + length)
            own_valid, own_free = expected_valid[part].view(1, 1, -1), torch.zeros(1, 1, dtype=torch.int64)
            eviction.evict_lowest_torch(
                priority[part].view(1, 1, -1), own_valid, positions[part].view(1, 1, -1),
                budget[row, head].view(1), own_free, column, newest[row].view(1),
            )  # fmt: skip
            expected_valid[part] = own_valid.view(-1)
            expected_free[row, head] = start + own_free
    before = valid.clone()
    eviction.evict_lowest(priority, valid, positions, budget, free, column, newest, segments)
    assert torch.equal(valid, expected_valid) and torch.equal(free, expected_free)
    assert 0 < int((before & ~valid).sum()) < 6  # some heads were over budget, by one token


def packed_write(seed: int):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([[5, 30], [1, 9]])
    flat = lengths.flatten()
    offsets = (flat.cumsum(0) - flat).view_as(lengths)
    total, dim = int(flat.sum()), 16
    free = offsets + (torch.rand(lengths.shape, generator=generator) * lengths).long()
    new = torch.randn(2, 2, 1, 2 * dim, generator=generator)
    buffers = (
        torch.randn(total, dim, generator=generator),
        torch.randn(total, dim, generator=generator),
        torch.randint(0, 30, (total,), generator=generator),
        torch.rand(total, generator=generator) > 0.5,
        torch.rand(total, generator=generator),
    )
    segments = Segments(offsets.to(DEVICE), lengths.to(DEVICE), int(lengths.max()))
    tensors = [t.to(DEVICE) for t in (new[..., :dim], new[..., dim:], *buffers, free, torch.tensor([40]))]
    return tensors, segments


@pytest.mark.skipif(common.triton is None, reason="needs Triton")
def test_packed_write_triton_matches_its_torch_twin_and_fills_each_free_slot():
    runs = []
    for write in (slots.write_slot_torch, slots.write_slot_triton):
        tensors, segments = packed_write(5)
        write(*tensors, segments=segments)
        runs.append(tensors)
    for want, got in zip(*runs, strict=True):
        assert torch.equal(want, got)
    key, _, keys, _, positions, valid, scores, free, _ = runs[0]
    slot = free.flatten()
    assert torch.equal(keys[slot], key.reshape(-1, 16))
    assert (positions[slot] == 40).all() and valid[slot].all() and (scores[slot] == 0).all()
