"""Writing the new token into its free slot of the fast engine's buffer (keys, values, position,
validity, score), in place; the Triton kernel does it in one launch per layer. A packed buffer
(:class:`~squeezekv.ops.decode.Segments`) has one free slot per (sequence, head) segment."""

from __future__ import annotations

import torch

from squeezekv.ops.common import tl, triton, use_triton
from squeezekv.ops.decode import Segments

if triton is not None:

    @triton.jit
    def _write_slot(
        KEY, VALUE, KEYS, VALUES, POSITIONS, VALID, SCORES, FREE, COLUMN,
        skb, skh, skd, svb, svh, svd,
        sKb, sKh, sKn, sKd, sVb, sVh, sVn, sVd,
        spb, sph, sps, sab, sah, sas, ssb, ssh, sss,
        kv_heads, heads,
        DIM: tl.constexpr, VALUE_DIM: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0)
        batch, kv_head = row // kv_heads, row % kv_heads
        head = kv_head if heads > 1 else 0
        slot = tl.load(FREE + batch * heads + head)
        dims = tl.arange(0, DIM)
        key = tl.load(KEY + batch * skb + kv_head * skh + dims * skd)
        tl.store(KEYS + batch * sKb + kv_head * sKh + slot * sKn + dims * sKd, key)
        dims = tl.arange(0, VALUE_DIM)
        value = tl.load(VALUE + batch * svb + kv_head * svh + dims * svd)
        tl.store(VALUES + batch * sVb + kv_head * sVh + slot * sVn + dims * sVd, value)
        if kv_head < heads:  # one program per bookkeeping row
            tl.store(POSITIONS + batch * spb + head * sph + slot * sps, tl.load(COLUMN))
            tl.store(VALID + batch * sab + head * sah + slot * sas, 1)
            tl.store(SCORES + batch * ssb + head * ssh + slot * sss, 0.0)


def write_slot(
    key: torch.Tensor,
    value: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor,
    scores: torch.Tensor,
    free: torch.Tensor,
    column: torch.Tensor,
    segments: Segments | None = None,
) -> None:
    """Writes one new token per sequence (``key``/``value``: ``[batch, kv_heads, 1, dim]``) into slot
    ``free`` (``[batch, 1 or kv_heads]``, contiguous) of the buffers, with position ``column``
    (a one-element tensor), valid and score 0. With ``segments`` the buffers are packed (keys and
    values ``[slots, dim]``, the rest ``[slots]``) and ``free`` (``[batch, kv_heads]``) holds packed
    indices."""
    write = write_slot_triton if use_triton(keys) else write_slot_torch
    write(key, value, keys, values, positions, valid, scores, free, column, segments)


def write_slot_torch(
    key: torch.Tensor,
    value: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor,
    scores: torch.Tensor,
    free: torch.Tensor,
    column: torch.Tensor,
    segments: Segments | None = None,
) -> None:
    """The torch twin of :func:`write_slot_triton` (same arguments, same result)."""
    if segments is not None:
        slot = free.view(-1)
        keys.index_copy_(0, slot, key.reshape(-1, keys.shape[-1]))
        values.index_copy_(0, slot, value.reshape(-1, values.shape[-1]))
        positions.index_copy_(0, slot, column.expand_as(slot))
        valid.index_fill_(0, slot, True)
        scores.index_fill_(0, slot, 0.0)
        return
    kv_slot = free.expand(-1, key.shape[1]).unsqueeze(-1).unsqueeze(-1)
    keys.scatter_(2, kv_slot.expand(-1, -1, -1, key.shape[-1]), key)
    values.scatter_(2, kv_slot.expand(-1, -1, -1, value.shape[-1]), value)
    record_written_slot(positions, valid, scores, free, column)


def record_written_slot(
    positions: torch.Tensor,
    valid: torch.Tensor,
    scores: torch.Tensor,
    free: torch.Tensor,
    column: torch.Tensor,
) -> None:
    """The bookkeeping of a slot just written (``free``: ``[batch, 1 or heads]``): its position
    ``column`` (broadcast to ``[batch, 1, 1]``), valid, and score 0."""
    slot = free.unsqueeze(-1)
    positions.scatter_(-1, slot, column.expand_as(slot))
    valid.scatter_(-1, slot, True)
    scores.scatter_(-1, slot, 0.0)


def write_slot_triton(
    key: torch.Tensor,
    value: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor,
    scores: torch.Tensor,
    free: torch.Tensor,
    column: torch.Tensor,
    segments: Segments | None = None,
) -> None:
    """The Triton kernel behind :func:`write_slot` (a packed buffer is read with batch and head
    strides 0: ``free`` already holds packed indices)."""
    flags = valid.view(torch.int8)
    buffers = (keys, values, positions, flags, scores)
    if segments is None:
        batch, kv_heads = keys.shape[:2]
        heads = positions.shape[1]
        strides = [stride for buffer in buffers for stride in buffer.stride()]
    else:
        batch, kv_heads = segments.offsets.shape
        heads = kv_heads
        strides = [stride for buffer in buffers for stride in (0, 0, *buffer.stride())]
    _write_slot[(batch * kv_heads,)](
        key, value, keys, values, positions, flags, scores, free, column,
        key.stride(0), key.stride(1), key.stride(3), value.stride(0), value.stride(1), value.stride(3),
        *strides, kv_heads, heads, DIM=keys.shape[-1], VALUE_DIM=values.shape[-1],
    )  # fmt: skip
