"""The decode step's cache: the running requests' layers in the block pool, one token per row.

It keeps exactly the tokens the fast engine's :class:`~squeezekv.cache.StaticCache` keeps (write
the new token into the free slot, attend, fold the attention mass into the scores, drop the
lowest-ranked token of a row over its budget), but every row has its own column, budgets and block
table, so requests at different points of their answers decode together. The keys and values stay
in the pool: the new token is written into its block and attention reads each row's blocks through
its block table (:mod:`squeezekv.ops.paged`). The bookkeeping the policy ranks (positions,
validity, scores) is one dense buffer per layer while the batch's membership holds, so the policy
and the eviction run on it as on the fast engine's buffers.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin

from squeezekv.cache.base import CompressedCache
from squeezekv.cache.static import BufferView
from squeezekv.config import SqueezeConfig
from squeezekv.ops import evict_lowest
from squeezekv.ops.paged import paged_decode_attention, write_paged_slot
from squeezekv.policies import KEEP
from squeezekv.serving.store import PAD_BLOCK, BlockPool, LayerSlots


class PagedLayer(CacheLayerMixin):
    """One layer of the batch: its rows' block tables (``[batch, blocks]``), budgets, free slots and
    bookkeeping (``positions``, ``valid``, ``scores``: ``[batch, kv_heads, blocks * block_size]``,
    copied from the pool when the batch is built)."""

    is_sliding = False

    def __init__(self, pool: BlockPool, slots: list[LayerSlots]) -> None:
        super().__init__()
        device = pool.keys.device
        width = max(len(row.blocks) for row in slots)
        tables = [row.blocks + [PAD_BLOCK] * (width - len(row.blocks)) for row in slots]
        self.tables = torch.tensor(tables, dtype=torch.long, device=device)
        self.budget = torch.tensor([row.budget for row in slots], device=device)
        self.free = torch.stack([row.free for row in slots]).to(device)
        self.positions, self.valid, self.scores = pool.bookkeeping(self.tables)
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("a PagedLayer is built from stored requests")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        raise RuntimeError("PagedLayer is updated through PagedCache.update")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return int(self.tables.shape[1]), 0  # unused: squeezekv's attention masks from positions

    def get_seq_length(self) -> int:
        raise RuntimeError("a PagedCache needs explicit position_ids")

    def get_max_length(self) -> int:
        return -1


class PagedCache(CompressedCache):
    """The running rows' decode cache over ``pool``; ``layers[l]`` was built from ``slots[row][l]``.

    ``columns`` (``[batch]``) is each row's column of the token this step feeds; ``prompt_columns``
    each row's prompt length. Build a new one whenever the batch's membership changes (after
    :meth:`store_back`).
    """

    def __init__(
        self,
        pool: BlockPool,
        slots: list[list[LayerSlots]],
        config: SqueezeConfig,
        columns: list[int],
        prompt_columns: list[int],
        scored: bool,
        explicit: bool,
    ) -> None:
        device = pool.keys.device
        layers = [PagedLayer(pool, [row[index] for row in slots]) for index in range(len(slots[0]))]
        super().__init__(layers=layers)
        self.pool, self.config, self.slots = pool, config, slots
        self.scored, self.explicit = scored, explicit
        self.columns = torch.tensor(columns, device=device)
        self.prompt_columns = torch.tensor(prompt_columns, device=device).view(-1, 1, 1)
        self.first_column = torch.zeros(len(columns), dtype=torch.long, device=device)
        self.budgets = torch.stack([layer.budget.cpu() for layer in layers], dim=1)
        self.prompt_tokens = self.prompt_columns.view(-1).cpu()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx]
        write_paged_slot(
            key_states, value_states, self.pool.keys, self.pool.values, layer.tables,
            layer.positions, layer.valid, layer.scores, layer.free, self.columns,
        )  # fmt: skip
        return key_states, value_states

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
        layer, policy = self.layers[layer_idx], self.config.policy
        additive = self.scored and policy.adds_mass  # the mass is added to the scores as it is computed
        output, mass = paged_decode_attention(
            query, self.pool.keys, self.pool.values, layer.tables, layer.positions, layer.valid,
            self.columns, sliding_window, scaling, with_mass=self.scored,
            add_mass_to=layer.scores if additive else None, softcap=softcap, explicit=self.explicit,
        )  # fmt: skip
        if mass is not None:
            layer.scores.copy_(policy.fold(layer.scores, mass, "decode"))
        column = self.columns.view(-1, 1, 1)
        if sliding_window is not None:
            layer.valid &= layer.positions > column - sliding_window + 1
        view = BufferView(
            layer.positions,
            layer.valid,
            layer.scores,
            "decode",
            self.prompt_columns,
            self.first_column,
            column,
        )
        priority = policy.priority(view, layer.budget).expand_as(layer.valid)
        newest = policy.newest_kept(layer.budget)
        if newest is not None:  # applied here, so that the eviction kernel needs no per-row column
            priority = torch.where(layer.positions > column - newest.view(-1, 1, 1), KEEP, priority)
        evict_lowest(priority.contiguous(), layer.valid, layer.positions, layer.budget, layer.free)
        return output

    def advance(self) -> None:
        self.columns += 1

    def store_back(self) -> None:
        """Hands each row's bookkeeping back to the pool and its free slots to its
        :class:`LayerSlots`, before the batch is rebuilt."""
        for index, layer in enumerate(self.layers):
            self.pool.store_bookkeeping(layer.tables, layer.positions, layer.valid, layer.scores)
            for row, free in zip(self.slots, layer.free, strict=True):
                row[index].free = free

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.columns.max())

    def kv_bytes_kept(self) -> int:
        blocks = sum(len(layer.blocks) for row in self.slots for layer in row)
        return blocks * self.pool.bytes_per_block

    def kv_bytes_full(self) -> int:
        per_slot = self.pool.bytes_per_block // self.pool.block_size
        return int(self.columns.sum()) * len(self.layers) * per_slot

    def held_tokens(self) -> torch.Tensor:
        return torch.stack([layer.valid.sum(-1).amax(-1).cpu() for layer in self.layers], dim=1)
