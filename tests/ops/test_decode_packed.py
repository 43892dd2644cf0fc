"""Decode attention over a packed buffer (heads of different lengths): the Triton pair against its
torch twin, and the torch twin against plain attention over each head's own tokens.

Without a GPU the Triton side runs in Triton's interpreter (``tests/conftest.py`` turns it on).
"""

from __future__ import annotations

import pytest
import torch

from squeezekv.ops import common, decode
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
