"""Layers whose key-value heads keep different numbers of tokens (a head-wise policy), packed.

A head-wise policy (:meth:`~squeezekv.policies.Policy.head_budgets`) gives each (sequence, key
head) of a layer its own budget. Stored as ``[batch, heads, slots, dim]``, every head would be as
wide as the widest and the memory saved would be a pretence, so these layers keep one
``[tokens, dim]`` tensor for keys and one for values, plus each token's column, validity and
score: each (sequence, head) is a segment of it, in column order, the segments in row-major
(sequence, head) order. A layer's cost is then the sum of its heads' budgets.

:class:`RaggedLayer` serves :class:`~squeezekv.cache.SqueezeCache` (any forward); attention and the
policy see a right-aligned padded view of it (each segment's newest token in the last slot, as
:func:`~squeezekv.ops.prefill_attention` wants the new tokens last), built for one layer at a time
and dropped when its attention is done. :class:`RaggedStaticLayer` is the fast engine's buffer:
each segment its head's budget plus one free slot, fixed after prefill, which the decode kernels
read by offsets and lengths.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import CacheLayerMixin

from squeezekv.ops import evict_lowest, write_slot
from squeezekv.ops.decode import Segments
from squeezekv.policies import LayerView, Policy, select

if TYPE_CHECKING:  # the dense layer it replaces; dynamic imports this module
    from squeezekv.cache.dynamic import SqueezeLayer


def right_aligned(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """``[batch, heads, width]``: the slots of a right-aligned padded view that hold a segment's
    tokens (segments of ``lengths`` tokens)."""
    return torch.arange(width, device=lengths.device) >= width - lengths.unsqueeze(-1)


def unpack(packed: torch.Tensor, slots: torch.Tensor, fill: float | bool) -> torch.Tensor:
    """``packed`` (``[tokens, ...]``) laid out in the ``slots`` (``[batch, heads, width]``) that
    hold tokens, the other slots ``fill``."""
    padded = packed.new_full((*slots.shape, *packed.shape[1:]), fill)
    padded[slots] = packed
    return padded


def segment_starts(lengths: torch.Tensor) -> torch.Tensor:
    """The packed index of each segment's first slot (``lengths``' shape)."""
    flat = lengths.flatten()
    return (flat.cumsum(0) - flat).view_as(lengths)


class RaggedLayer(CacheLayerMixin):
    """One layer of a :class:`~squeezekv.cache.SqueezeCache` whose heads keep ``head_budgets``
    (``[batch, heads]``) tokens each, packed (see the module).

    ``positions``, ``valid`` and ``scores`` are the padded view ``[batch, heads, width]``, built
    when read; ``token_*`` are what is stored. Built from a :class:`~squeezekv.cache.SqueezeLayer`
    (its valid slots: all its tokens), which it replaces.
    """

    is_sliding = False
    appended_only = False

    def __init__(self, layer: SqueezeLayer, head_budgets: torch.Tensor) -> None:
        super().__init__()
        self.sliding_window, self.seen = layer.sliding_window, layer.seen
        shape = layer.keys.shape[:3]
        held = layer.valid.expand(shape)
        self.keys, self.values = layer.keys[held], layer.values[held]
        self.token_positions = layer.positions.expand(shape)[held]
        self.token_valid = held[held]
        self.token_scores = layer.scores.expand(shape)[held]
        self.lengths = held.sum(-1)
        self.width = int(self.lengths.max())
        self.head_budgets = head_budgets.to(self.lengths.device)
        self.is_initialized = True

    def padded(self, packed: torch.Tensor, fill: float | bool) -> torch.Tensor:
        return unpack(packed, right_aligned(self.lengths, self.width), fill)

    @property
    def positions(self) -> torch.Tensor:
        return self.padded(self.token_positions, -1)  # -1: no query's column, so no query sees a gap

    @property
    def valid(self) -> torch.Tensor:
        return self.padded(self.token_valid, False)

    @property
    def scores(self) -> torch.Tensor:
        return self.padded(self.token_scores, 0.0)

    def append(
        self, key_states: torch.Tensor, value_states: torch.Tensor, new_valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Appends ``q`` new tokens to every segment; returns this layer's keys and values in the
        padded view (a transient copy for this forward's attention)."""
        batch, heads, q = key_states.shape[:3]
        device = key_states.device
        before = right_aligned(self.lengths, self.width)
        self.lengths, self.width = self.lengths + q, self.width + q
        after = right_aligned(self.lengths, self.width)

        def grow(packed: torch.Tensor, new: torch.Tensor, fill: float | bool):
            """The padded view with the new tokens, and its packed form."""
            padded = torch.cat([unpack(packed, before, fill), new], dim=2)
            return padded, padded[after]

        keys, self.keys = grow(self.keys, key_states, 0.0)
        values, self.values = grow(self.values, value_states, 0.0)
        columns = torch.arange(self.seen, self.seen + q, device=device).expand(batch, heads, q)
        self.token_positions = grow(self.token_positions, columns, -1)[1]
        new_valid = new_valid.to(device)[:, None].expand(-1, heads, -1)
        self.token_valid = grow(self.token_valid, new_valid, False)[1]
        self.token_scores = grow(self.token_scores, self.token_scores.new_zeros(batch, heads, q), 0.0)[1]
        self.seen += q
        return keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        raise RuntimeError("RaggedLayer is updated through SqueezeCache.update")

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("a RaggedLayer is built from an evicted SqueezeLayer")

    def add_mass(self, mass: torch.Tensor, phase: str, policy: Policy) -> None:
        """Folds this forward's mass per key (``[batch, heads, width]``, the padded view) into the scores."""
        folded = policy.fold(self.scores, mass.float(), phase)
        self.token_scores = folded[right_aligned(self.lengths, self.width)]

    def visible(self) -> torch.Tensor:
        if self.sliding_window is None:
            return self.valid
        return self.valid & (self.positions > self.seen - self.sliding_window)

    @staticmethod
    def eviction_need(visible: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
        """Always evicts (which also repacks); the width is worked out per head in :meth:`evict`.
        Stacked as :meth:`SqueezeLayer.eviction_need`'s: ``[layers, 2]``."""
        return torch.ones(visible.shape[0], 2, dtype=torch.int64, device=visible.device)

    def evict(self, budget: torch.Tensor, width: int, view: LayerView, policy: Policy) -> None:
        """Shrinks every head to its budget; at a (chunked) prefill the policy spreads ``budget``
        (``[batch]``) over the heads again, for the prompt seen so far. Called as
        :meth:`SqueezeLayer.evict <squeezekv.cache.SqueezeLayer.evict>` is (``width`` is not used:
        each head has its own)."""
        visible = view.valid
        if view.phase == "prefill":
            spread = policy.head_budgets(view, budget)
            every = budget.to(visible.device).view(-1, 1).expand_as(self.lengths)
            self.head_budgets = every if spread is None else spread
        priority = policy.ranking(view, budget).expand(visible.shape)
        widest = int(torch.minimum(self.head_budgets, visible.sum(-1)).max())
        chosen, kept = select(priority, visible, self.head_budgets, widest)
        kept = kept & visible.gather(-1, chosen)
        first = segment_starts(self.lengths) + self.lengths - visible.shape[-1]  # packed index of slot 0
        picked = (first.unsqueeze(-1) + chosen)[kept]
        self.keys, self.values = self.keys[picked], self.values[picked]
        self.token_positions, self.token_valid = self.token_positions[picked], self.token_valid[picked]
        self.token_scores = self.token_scores[picked]
        self.lengths = kept.sum(-1)
        self.width = int(self.lengths.max())

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        """Drops every tensor, so the memory is freed."""
        self.keys = self.values = self.token_positions = self.token_valid = self.token_scores = None
        self.lengths = self.head_budgets = None
        self.seen, self.width, self.is_initialized = 0, 0, False

    def held_tokens(self) -> torch.Tensor:
        """Tokens each sequence holds per head, on average over heads and rounded up: what the
        layer's budget counts, since heads hold different numbers (``[batch]``)."""
        held = self.valid.sum(-1)
        return -(-held.sum(-1) // held.shape[-1])

    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        return self.keys.nbytes + self.values.nbytes

    def full_bytes(self) -> int:
        if not self.is_initialized:
            return 0
        return 2 * self.lengths.numel() * self.seen * self.keys.shape[-1] * self.keys.element_size()


def packed_layer(layer: SqueezeLayer | RaggedLayer, budget: torch.Tensor) -> RaggedLayer:
    """``layer`` as a :class:`RaggedLayer`: itself if it is one, else every head with ``budget``
    (``[batch]``), for a fast-engine buffer whose other micro-batches are head-wise."""
    if isinstance(layer, RaggedLayer):
        return layer
    heads = layer.keys.shape[1]
    return RaggedLayer(layer, budget.view(-1, 1).expand(-1, heads))


class RaggedStaticLayer(CacheLayerMixin):
    """The fast engine's buffer for a head-wise layer: packed ``[slots, dim]`` keys and values and
    per-slot ``positions``, ``valid``, ``scores``; each (sequence, head) a segment of its budget
    plus one free slot (``segments``), ``free`` (``[batch, heads]``) the packed index of each
    segment's free slot.

    The decode step writes, attends, and evicts per segment in place, with static shapes, through
    the same ops as :class:`~squeezekv.cache.StaticLayer` (one launch each on a GPU). The policy's
    priority is computed on the per-slot tensors, so a head-wise policy's decode priority must be
    elementwise (SnapKV's is).
    """

    is_sliding = False
    is_compileable = True
    packed = None  # head-wise layers are not quantized

    def __init__(self, parts: list[RaggedLayer], budget: torch.Tensor, policy: Policy) -> None:
        """Stacks the prefilled layers of several micro-batches (their rows, in order)."""
        super().__init__()
        first = parts[0]
        device = first.keys.device
        self.sliding_window = first.sliding_window
        self.budget = budget.to(device)
        self.newest_kept = policy.newest_kept(self.budget)
        self.head_budgets = torch.cat([part.head_budgets for part in parts]).to(device)
        slots = self.head_budgets + 1
        starts = segment_starts(slots)
        self.segments = Segments(starts.contiguous(), slots.contiguous(), int(slots.max()))
        total = int(slots.sum())
        self.keys = first.keys.new_zeros(total, first.keys.shape[-1])
        self.values = first.values.new_zeros(total, first.values.shape[-1])
        self.positions = first.token_positions.new_zeros(total)
        self.valid = first.token_valid.new_zeros(total)
        self.scores = first.token_scores.new_zeros(total)
        held, base = [], 0
        for part in parts:  # each part's tokens to the start of its segments
            count = part.lengths.flatten()
            token_segment = torch.repeat_interleave(torch.arange(count.numel(), device=device), count)
            rank = torch.arange(int(count.sum()), device=device) - (count.cumsum(0) - count)[token_segment]
            destination = starts.flatten()[base + token_segment] + rank
            for buffer, packed in (
                (self.keys, part.keys),
                (self.values, part.values),
                (self.positions, part.token_positions),
                (self.valid, part.token_valid),
                (self.scores, part.token_scores),
            ):
                buffer[destination] = packed
            held.append(count)
            base += count.numel()
        self.free = (starts.flatten() + torch.cat(held)).view_as(starts)
        self.is_initialized = True

    def write(self, key: torch.Tensor, value: torch.Tensor, column: torch.Tensor) -> None:
        """Puts the new token (``[batch, heads, 1, dim]``) in each segment's free slot, in place."""
        buffers = (self.keys, self.values, self.positions, self.valid, self.scores)
        write_slot(key, value, *buffers, self.free, column, self.segments)

    def evict(self, view: LayerView, policy: Policy) -> None:
        """Drops, in segments over their head's budget, the lowest-ranked token (ties: the oldest);
        frees a slot."""
        if self.sliding_window is not None:
            self.valid &= self.positions > view.last_column - self.sliding_window + 1
        priority = policy.priority(view, self.budget)
        evict_lowest(
            priority, self.valid, self.positions, self.head_budgets, self.free, view.last_column,
            self.newest_kept, self.segments,
        )  # fmt: skip

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("a RaggedStaticLayer is built from prefilled layers")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        raise RuntimeError("RaggedStaticLayer is updated through StaticCache.update")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.segments.width, 0

    def get_seq_length(self) -> int:
        raise RuntimeError("a StaticCache needs explicit position_ids")

    def get_max_length(self) -> int:
        return self.segments.width

    def held_tokens(self) -> torch.Tensor:
        """As :meth:`RaggedLayer.held_tokens`: per head on average, rounded up (``[batch]``)."""
        held = self.segments.padded(self.valid, False).sum(-1)
        return -(-held.sum(-1) // held.shape[-1])

    def full_bytes(self, columns: int) -> int:
        return 2 * self.head_budgets.numel() * columns * self.keys.shape[-1] * self.keys.element_size()

    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def row_overhead_bytes(self) -> int:
        return 0
