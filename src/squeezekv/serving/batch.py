"""The decode step's cache: the running requests' layers in the block pool, one token per row.

It keeps exactly the tokens the fast engine's :class:`~squeezekv.cache.StaticCache` keeps (write
the new token into the free slot, attend, fold the attention mass into the scores, drop the
lowest-ranked token of a row over its budget), but every row has its own column, budgets and block
table, so requests at different points of their answers decode together. Attention reads a row's
blocks gathered into one buffer per layer (the torch path: a transient copy of one layer).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin

from squeezekv.cache.base import CompressedCache
from squeezekv.cache.static import BufferView
from squeezekv.config import SqueezeConfig
from squeezekv.ops import decode_attention, evict_lowest
from squeezekv.ops.decode import decode_attention_torch
from squeezekv.policies import KEEP
from squeezekv.serving.store import PAD_BLOCK, BlockPool, LayerSlots


class PagedLayer(CacheLayerMixin):
    """One layer of the batch: its rows' block tables (``[batch, blocks]``), budgets and free slots."""

    is_sliding = False

    def __init__(self, slots: list[LayerSlots], sliding_window: int | None, device: torch.device) -> None:
        super().__init__()
        width = max(len(row.blocks) for row in slots)
        tables = [row.blocks + [PAD_BLOCK] * (width - len(row.blocks)) for row in slots]
        self.tables = torch.tensor(tables, dtype=torch.long, device=device)
        self.budget = torch.tensor([row.budget for row in slots], device=device)
        self.free = torch.stack([row.free for row in slots]).to(device)
        self.sliding_window = sliding_window
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
    :meth:`store_free_slots`).
    """

    def __init__(
        self,
        pool: BlockPool,
        slots: list[list[LayerSlots]],
        sliding_windows: list[int | None],
        config: SqueezeConfig,
        columns: list[int],
        prompt_columns: list[int],
        scored: bool,
        explicit: bool,
    ) -> None:
        device = pool.keys.device
        layers = [
            PagedLayer([row[index] for row in slots], window, device)
            for index, window in enumerate(sliding_windows)
        ]
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
        self.pool.write(layer.tables, layer.free, key_states, value_states, self.columns)
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
        keys, values, positions, valid, scores = self.pool.gather(layer.tables)
        column = self.columns.view(-1, 1, 1)
        # the Triton kernels read one column for all rows, used only for a sliding window
        attend = decode_attention if sliding_window is None else decode_attention_torch
        output, mass = attend(
            query, keys, values, positions, valid, column, sliding_window, scaling,
            with_mass=self.scored, softcap=softcap, explicit=self.explicit,
        )  # fmt: skip
        if mass is not None:
            scores = policy.fold(scores, mass, "decode")
        if sliding_window is not None:
            valid &= positions > column - sliding_window + 1
        view = BufferView(positions, valid, scores, "decode", self.prompt_columns, self.first_column, column)
        priority = policy.priority(view, layer.budget).expand_as(valid)
        newest = policy.newest_kept(layer.budget)
        if newest is not None:  # applied here, so that the eviction kernel needs no per-row column
            priority = torch.where(positions > column - newest.view(-1, 1, 1), KEEP, priority)
        evict_lowest(priority.contiguous(), valid, positions, layer.budget, layer.free)
        self.pool.scatter(layer.tables, valid, scores)
        return output

    def advance(self) -> None:
        self.columns += 1

    def store_free_slots(self) -> None:
        """Hands each row's free slots back to its :class:`LayerSlots`, before the batch is rebuilt."""
        for index, layer in enumerate(self.layers):
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
        held = []
        for layer in self.layers:
            _, _, _, valid, _ = self.pool.gather(layer.tables)
            held.append(valid.sum(-1).amax(-1).cpu())
        return torch.stack(held, dim=1)
