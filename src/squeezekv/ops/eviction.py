"""The fast engine's eviction: per row, the lowest-priority valid slot leaves if the row is over its
budget, and the next free slot is found. The Triton kernel does it in a single pass per row, one
launch per layer. In a packed buffer (:class:`~squeezekv.ops.decode.Segments`) a row is one
(sequence, head) segment, with a budget of its own."""

from __future__ import annotations

import math

import torch

from squeezekv.ops.common import tl, triton, use_triton
from squeezekv.ops.decode import Segments

EVICT_BLOCK = 2048  # the most slots one program ranks at once (the H200 sweep's best: one block, 8 warps)

if triton is not None:

    @triton.jit
    def _lower(priority, position, slot, held, empty, other_priority, other_position, other_slot,
               other_held, other_empty):  # fmt: skip
        """Combines two partial answers: the lower (priority, position), the valid slots held, the
        first empty slot."""
        other = (other_priority < priority) | ((other_priority == priority) & (other_position < position))
        return (
            tl.where(other, other_priority, priority),
            tl.where(other, other_position, position),
            tl.where(other, other_slot, slot),
            held + other_held,
            tl.minimum(empty, other_empty),
        )

    @triton.jit
    def _evict_lowest(
        PRIORITY, VALID, POSITIONS, BUDGET, FREE, COLUMN, NEWEST, OFFSETS, LENGTHS, slots, heads,
        spb, sph, sps, svb, svh, svs, sqb, sqh, sqs,
        BS: tl.constexpr, BLOCKS: tl.constexpr, HAS_NEWEST: tl.constexpr, PACKED: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0)
        batch, head = row // heads, row % heads
        none = 2**62
        if PACKED:  # this row's segment of the packed buffer (batch and head strides are 0)
            first = tl.load(OFFSETS + row)
            length = tl.load(LENGTHS + row)
            budget = tl.load(BUDGET + row)
        else:
            first = 0
            length = slots
            budget = tl.load(BUDGET + batch)
        if HAS_NEWEST:
            kept_after = tl.load(COLUMN) - tl.load(NEWEST + batch)
        lowest = tl.full((), float("inf"), tl.float32)
        oldest = tl.full((), none, tl.int64)
        victim = tl.full((), 0, tl.int64)
        held = tl.zeros((), tl.int32)
        first_empty = tl.full((), none, tl.int64)
        for block in range(0, BLOCKS):
            cols = (block * BS + tl.arange(0, BS)).to(tl.int64)
            inside = cols < length
            cols += first
            # three independent loads (none masked by another's result), so they are in flight together
            valid = tl.load(VALID + batch * svb + head * svh + cols * svs, mask=inside, other=0) != 0
            priority = tl.load(PRIORITY + batch * spb + head * sph + cols * sps, mask=inside, other=0)
            positions = tl.load(POSITIONS + batch * sqb + head * sqh + cols * sqs, mask=inside, other=0)
            priority = tl.where(valid, priority.to(tl.float32), float("inf"))
            positions = tl.where(valid, positions, none)
            if HAS_NEWEST:
                priority = tl.where(positions > kept_after, float("inf"), priority)
            empty = tl.where(inside & ~valid, cols, none)
            block_answer = tl.reduce((priority, positions, cols, valid.to(tl.int32), empty), 0, _lower)
            lowest, oldest, victim, held, first_empty = _lower(
                lowest, oldest, victim, held, first_empty, *block_answer
            )
        if held > budget:
            tl.store(VALID + batch * svb + head * svh + victim * svs, 0)
            first_empty = tl.minimum(first_empty, victim)
        tl.store(FREE + row, tl.where(first_empty == none, first, first_empty))


def evict_lowest(
    priority: torch.Tensor,
    valid: torch.Tensor,
    positions: torch.Tensor,
    budget: torch.Tensor,
    free: torch.Tensor,
    column: torch.Tensor | None = None,
    newest: torch.Tensor | None = None,
    segments: Segments | None = None,
) -> None:
    """In place, per row of ``[batch, heads, slots]``: if more slots are valid than the sequence's
    ``budget`` (``[batch]``), invalidates the valid slot of lowest ``priority`` (ties: smallest
    position); then sets ``free`` (``[batch, heads]``, contiguous) to the first invalid slot (0 if
    none). ``priority`` and ``positions`` may have one head for all. With ``newest`` (``[batch]``),
    tokens at positions above ``column`` (one element) minus ``newest`` rank as ``KEEP``.

    With ``segments`` the buffer is packed: ``priority``, ``valid``, ``positions`` are ``[slots]``,
    each row a segment with its own ``budget`` (``[batch, heads]``); ``free`` holds packed indices
    (a full segment's first slot if none is free).
    """
    evict = evict_lowest_triton if use_triton(valid) else evict_lowest_torch
    evict(priority, valid, positions, budget, free, column, newest, segments)


def evict_lowest_torch(
    priority: torch.Tensor,
    valid: torch.Tensor,
    positions: torch.Tensor,
    budget: torch.Tensor,
    free: torch.Tensor,
    column: torch.Tensor | None = None,
    newest: torch.Tensor | None = None,
    segments: Segments | None = None,
) -> None:
    """The torch twin of :func:`evict_lowest_triton` (same arguments, same result)."""
    if segments is not None:
        evict_lowest_packed_torch(priority, valid, positions, budget, free, column, newest, segments)
        return
    if newest is not None:
        priority = torch.where(positions > column - newest.view(-1, 1, 1), torch.inf, priority)
    priority = torch.where(valid, priority.float(), torch.inf)  # float32, as the kernel ranks
    lowest = priority == priority.amin(-1, keepdim=True)
    oldest = torch.where(lowest & valid, positions, torch.iinfo(torch.int64).max)
    victim = oldest.argmin(-1, keepdim=True)
    over = valid.sum(-1, keepdim=True) > budget.view(-1, 1, 1)
    valid.scatter_(-1, victim, valid.gather(-1, victim) & ~over)
    free.copy_((~valid).to(torch.uint8).argmax(-1))


def evict_lowest_packed_torch(
    priority: torch.Tensor,
    valid: torch.Tensor,
    positions: torch.Tensor,
    budget: torch.Tensor,
    free: torch.Tensor,
    column: torch.Tensor | None,
    newest: torch.Tensor | None,
    segments: Segments,
) -> None:
    """The packed case of :func:`evict_lowest_torch`: the same rule, by segment reductions."""
    never = torch.iinfo(torch.int64).max
    count, heads = segments.lengths.numel(), segments.lengths.shape[1]
    slot = torch.arange(valid.numel(), device=valid.device)
    segment = torch.repeat_interleave(
        torch.arange(count, device=valid.device), segments.lengths.flatten(), output_size=valid.numel()
    )
    if newest is not None:
        priority = torch.where(positions > column - newest[segment // heads], torch.inf, priority)
    ranked = torch.where(valid, priority.float(), torch.inf)

    def lowest(values: torch.Tensor, fill: float | int) -> torch.Tensor:
        return values.new_full((count,), fill).scatter_reduce(0, segment, values, "amin")

    tied = valid & (ranked == lowest(ranked, torch.inf)[segment])
    oldest = lowest(torch.where(tied, positions, never), never)
    victim = lowest(torch.where(tied & (positions == oldest[segment]), slot, never), never)
    held = torch.zeros(count, dtype=torch.int64, device=valid.device).index_add_(0, segment, valid.long())
    over = held > budget.flatten()
    victim = torch.where(over, victim, segments.offsets.flatten())  # rows within budget: no change
    valid.scatter_(0, victim, valid.gather(0, victim) & ~over)
    empty = lowest(torch.where(valid, never, slot), never)
    free.view(-1).copy_(torch.where(empty == never, segments.offsets.flatten(), empty))  # none: the first


def evict_lowest_triton(
    priority: torch.Tensor,
    valid: torch.Tensor,
    positions: torch.Tensor,
    budget: torch.Tensor,
    free: torch.Tensor,
    column: torch.Tensor | None = None,
    newest: torch.Tensor | None = None,
    segments: Segments | None = None,
) -> None:
    """The Triton kernel behind :func:`evict_lowest`."""
    flags = valid.view(torch.int8)
    if segments is None:
        batch, heads, slots = valid.shape
        priority, positions = priority.expand_as(valid), positions.expand_as(valid)
        strides = (*priority.stride(), *flags.stride(), *positions.stride())
        offsets = lengths = budget
    else:
        (batch, heads), slots = segments.offsets.shape, segments.width
        strides = (0, 0, priority.stride(0), 0, 0, flags.stride(0), 0, 0, positions.stride(0))
        offsets, lengths = segments.offsets, segments.lengths
    block = min(EVICT_BLOCK, max(128, triton.next_power_of_2(slots)))
    _evict_lowest[(batch * heads,)](
        priority, flags, positions, budget, free, column, newest, offsets, lengths, slots, heads, *strides,
        BS=block, BLOCKS=triton.next_power_of_2(math.ceil(slots / block)), HAS_NEWEST=newest is not None,
        PACKED=segments is not None, num_warps=max(1, min(8, block // 256)),
    )  # fmt: skip
