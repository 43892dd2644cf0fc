"""The fast engine's cache: static-shape per-layer buffers for single-token decode steps.

After prefill every layer's budget is fixed, so each layer lives in a buffer of exactly its budget
plus one slot. A decode step writes the new token into the free slot in place, attends over the
buffer, updates the policy's scores and frees the slot of the token it evicts: no concatenation,
no reallocation, the same shapes every step, which makes the step capturable as one CUDA graph. It
keeps exactly the tokens the dynamic cache keeps. A layer whose heads have budgets of their own
is a packed :class:`~squeezekv.cache.ragged.RaggedStaticLayer` instead, each head its budget plus
one slot. A quantized layer (``kv_bits`` < 16) keeps its codes in a
:class:`~squeezekv.cache.quantized.StaticPackedStates` instead of ``keys`` and ``values``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import CacheLayerMixin

from squeezekv.cache.base import CompressedCache
from squeezekv.cache.dynamic import SqueezeCache, SqueezeLayer
from squeezekv.cache.quantized import StaticPackedStates
from squeezekv.cache.ragged import RaggedLayer, RaggedStaticLayer, packed_layer
from squeezekv.config import SqueezeConfig
from squeezekv.ops import decode_attention, evict_lowest, write_slot
from squeezekv.ops.slots import record_written_slot
from squeezekv.policies import LayerView, Policy


@dataclass(frozen=True)
class BufferView(LayerView):
    """A :class:`LayerView` of a buffer whose slots are not in position order.

    The newest tokens come from positions instead of slot order. That is exact for the question
    policies ask (the newest ``n`` tokens, which they always keep): those tokens are never evicted,
    so they are the contiguous columns ending at ``last_column``.
    """

    last_column: torch.Tensor | None = None

    def newest(self, count: torch.Tensor) -> torch.Tensor:
        return self.positions > self.last_column - count


class StaticLayer(CacheLayerMixin):
    """One layer's buffer: ``[batch, kv_heads, slots, dim]`` keys and values, ``slots`` = budget + 1,
    or their codes (``packed``).

    ``positions``, ``valid`` and ``scores`` are ``[batch, heads, slots]``; ``free`` (``[batch,
    heads]``) is the slot the next token is written to.
    """

    is_sliding = False
    is_compileable = True
    segments = None  # one buffer slice per head (a packed, head-wise layer has them)

    def __init__(
        self, parts: list[SqueezeLayer], budget: torch.Tensor, policy: Policy, new_columns: int
    ) -> None:
        """Stacks the prefilled layers of several micro-batches (their rows, in order) into one
        buffer, for a decode of at most ``new_columns`` columns."""
        super().__init__()
        first = parts[0]
        self.sliding_window = first.sliding_window
        self.budget = budget.to(first.positions.device)
        per_head = policy.scored_queries("decode", 1) > 0
        self.newest_kept = policy.newest_kept(self.budget)  # fixed with the budget
        batch = sum(part.positions.shape[0] for part in parts)
        kv_heads = first.packed.heads if first.packed is not None else first.keys.shape[1]
        heads = kv_heads if per_head else max(max(p.positions.shape[1], p.scores.shape[1]) for p in parts)
        self.slots = slots = int(budget.max()) + 1
        self.positions = first.positions.new_zeros(batch, heads, slots)
        self.valid = first.valid.new_zeros(batch, heads, slots)
        self.scores = first.scores.new_zeros(batch, heads, slots)
        if first.packed is not None:
            packed = [part.packed for part in parts]
            positions = [part.positions for part in parts]
            self.packed = StaticPackedStates(packed, positions, slots, new_columns)
            self.keys = self.values = None
        else:
            self.packed = None
            self.keys = first.keys.new_zeros(batch, kv_heads, slots, first.keys.shape[-1])
            self.values = first.values.new_zeros(batch, kv_heads, slots, first.values.shape[-1])
        row = 0
        for part in parts:
            rows, held = slice(row, row + part.positions.shape[0]), part.positions.shape[2]
            if self.packed is None:
                self.keys[rows, :, :held], self.values[rows, :, :held] = part.keys, part.values
            self.positions[rows, :, :held] = part.positions
            self.valid[rows, :, :held] = part.valid
            self.scores[rows, :, :held] = part.scores
            row = rows.stop
        self.free = (~self.valid).to(torch.uint8).argmax(-1)  # the slot the next token goes to
        self.is_initialized = True

    def write(self, key: torch.Tensor, value: torch.Tensor, column: torch.Tensor) -> None:
        """Puts the new token (``[batch, kv_heads, 1, dim]``) in the free slot, in place (a packed
        layer's in its residual window, the slot keeping its place)."""
        if self.packed is not None:
            self.packed.write(key, value, column)
            record_written_slot(self.positions, self.valid, self.scores, self.free, column)
            return
        write_slot(
            key, value, self.keys, self.values, self.positions, self.valid, self.scores, self.free, column
        )

    def evict(self, view: BufferView, policy: Policy) -> None:
        """Drops, in rows over budget, the lowest-ranked token (ties: the oldest); frees a slot."""
        if self.sliding_window is not None:
            self.valid &= self.positions > view.last_column - self.sliding_window + 1
        priority = policy.priority(view, self.budget)
        evict_lowest(
            priority, self.valid, self.positions, self.budget, self.free, view.last_column, self.newest_kept
        )

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("a StaticLayer is built from a prefilled SqueezeLayer")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        raise RuntimeError("StaticLayer is updated through StaticCache.update")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.slots, 0

    def get_seq_length(self) -> int:
        raise RuntimeError("a StaticCache needs explicit position_ids")

    def get_max_length(self) -> int:
        return self.slots

    def held_tokens(self) -> torch.Tensor:
        """Tokens each sequence holds: ``[batch]`` (the largest over heads)."""
        return self.valid.sum(-1).amax(-1)

    def full_bytes(self, columns: int) -> int:
        """Bytes a plain cache would hold for ``columns`` columns."""
        if self.packed is not None:
            return self.packed.full_bytes(self.positions.shape[0], columns)
        return 2 * self.keys[:, :, :1].nbytes * columns

    def nbytes(self) -> int:
        """Bytes of the keys and values (or their codes) the buffer allocates."""
        if self.packed is not None:
            return self.packed.nbytes()
        return self.keys.nbytes + self.values.nbytes

    def row_overhead_bytes(self) -> int:
        """Bytes one sequence takes whatever its slots (a packed layer's group table and window)."""
        return 0 if self.packed is None else self.packed.row_overhead_bytes()


class StaticCache(CompressedCache):
    """Per-layer buffers for single-token decode steps with static shapes, built from the prefilled
    caches of one or more micro-batches (their rows, in order), for a decode of at most
    ``new_columns`` columns.

    :meth:`after_step` runs on the host after every step, outside any captured graph: it quantizes
    the residual windows of packed layers when they are full.
    """

    def __init__(self, caches: list[SqueezeCache], config: SqueezeConfig, new_columns: int) -> None:
        first = caches[0]
        columns_seen = first.layers[0].seen
        layers = []
        for index in range(len(first.layers)):
            parts = [cache.layers[index] for cache in caches]
            budget = torch.cat([cache.budgets[:, index] for cache in caches])
            if any(isinstance(part, RaggedLayer) for part in parts):  # heads' budgets differ: packed
                packed = [packed_layer(p, c.budgets[:, index]) for p, c in zip(parts, caches, strict=True)]
                layers.append(RaggedStaticLayer(packed, budget, config.policy))
            else:
                layers.append(StaticLayer(parts, budget, config.policy, new_columns))
            for part in parts:  # one layer at a time: the conversion needs one layer's worth of extra memory
                part.reset()
        super().__init__(layers=layers)
        self.config = config
        self.budgets = torch.cat([cache.budgets for cache in caches])
        self.prompt_tokens = torch.cat([cache.prompt_tokens for cache in caches])
        first_column = torch.cat([c.prompt_columns - c.prompt_tokens for c in caches])
        devices = {layer.positions.device for layer in layers}  # several under a device_map
        self.seen = columns_seen  # on the host, for after_step
        self.packed_layers = [layer for layer in layers if layer.packed is not None]
        self.columns = {device: torch.tensor([columns_seen], device=device) for device in devices}
        self.first_columns = {device: first_column.to(device) for device in devices}
        questions = [cache.question_start for cache in caches]
        question_start = None if any(q is None for q in questions) else torch.cat(questions)
        self.question_starts = {
            device: None if question_start is None else question_start.to(device) for device in devices
        }
        self.prompt_columns = first.prompt_columns
        self.explicit = first.explicit

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx]
        layer.write(key_states, value_states, self.columns[layer.positions.device])
        if layer.packed is not None:  # attention reads the codes, not these
            return key_states, value_states
        return layer.keys, layer.values

    def attention(
        self,
        layer_idx: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scaling: float,
        softcap: float | None,
        sliding_window: int | None,
    ) -> torch.Tensor:
        layer = self.layers[layer_idx]
        column = self.columns[layer.positions.device]
        policy = self.config.policy
        scored = 0 if self.config.keeps_everything else policy.scored_queries("decode", 1)
        additive = scored and policy.adds_mass  # the mass is added to the scores as it is computed
        add_mass_to = layer.scores if additive else None
        if layer.packed is not None:
            output, mass = layer.packed.decode_attention(
                query, layer.positions, layer.valid, column, layer.sliding_window, scaling, scored > 0,
                add_mass_to, softcap, self.explicit,
            )  # fmt: skip
        else:
            output, mass = decode_attention(
                query, key, value, layer.positions, layer.valid, column, layer.sliding_window, scaling,
                with_mass=scored > 0, add_mass_to=add_mass_to, softcap=softcap, explicit=self.explicit,
                segments=layer.segments,
            )  # fmt: skip
        if mass is not None:  # in place: a captured step must read this step's scores on replay
            layer.scores.copy_(policy.fold(layer.scores, mass, "decode"))
        view = BufferView(
            layer.positions,
            layer.valid,
            layer.scores,
            phase="decode",
            prompt_columns=self.prompt_columns,
            first_column=self.first_columns[layer.positions.device],
            question_start=self.question_starts[layer.positions.device],
            last_column=column,
        )
        layer.evict(view, policy)
        return output

    def advance(self) -> None:
        for column in self.columns.values():
            column += 1

    def after_step(self) -> None:
        """On the host, after each decode step (its :meth:`advance` included)."""
        self.seen += 1
        for layer in self.packed_layers:
            layer.packed.settle(layer.positions, layer.valid, self.seen)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.columns[self.layers[layer_idx].positions.device])

    def kv_bytes_kept(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def row_overhead_bytes(self) -> int:
        """Bytes one sequence takes in every layer whatever its budgets (packed layers' windows and
        group tables): :func:`~squeezekv.bench.measure.fitting_rows` counts the rest per slot."""
        return sum(layer.row_overhead_bytes() for layer in self.layers)

    def kv_bytes_full(self) -> int:
        columns = self.get_seq_length()
        return sum(layer.full_bytes(columns) for layer in self.layers)

    def held_tokens(self) -> torch.Tensor:
        return torch.stack([layer.held_tokens().cpu() for layer in self.layers], dim=1)
