"""Paged KV storage for serving: a row's layer costs its own budget, not the widest row's.

One pool of fixed-size blocks serves every layer of every request. A request's layer holds
``budget + 1`` slots (its budget and the slot the next token is written to, as in the fast
engine's buffers) in as many whole blocks as that needs, listed in its block table; so the memory
in use is the sum over rows and layers of what each holds, rounded up to a block. Block 0 is never
handed out: it pads shorter block tables in a batch and always reads as empty.

Besides keys and values each slot keeps the token's column, whether it holds a token, and the
policy's running score, per key head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from squeezekv.ops.paged import gathered

PAD_BLOCK = 0


def blocks_for(slots: int, block_size: int) -> int:
    return -(-slots // block_size)


class BlockPool:
    """``blocks`` blocks of ``block_size`` slots, shared by all layers; block 0 is the padding block.

    Slots lead and heads follow (``[blocks, block_size, kv_heads, ...]``): the paged decode kernels
    read a slot's heads together. Keys and values are read and written in place every step; a row's
    bookkeeping moves to the decode batch's dense buffers when the batch is built and back when its
    membership changes (:meth:`read_bookkeeping`, :meth:`store_bookkeeping`).
    """

    def __init__(
        self,
        blocks: int,
        block_size: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        value_dim: int | None = None,
    ) -> None:
        if blocks < 2:
            raise ValueError(f"a block pool needs at least 2 blocks (one is padding), got {blocks}")
        if block_size < 1:
            raise ValueError(f"block_size {block_size} must be >= 1")
        self.block_size, self.kv_heads = block_size, kv_heads
        shape = (blocks, block_size, kv_heads)
        self.keys = torch.zeros(*shape, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros(*shape, value_dim or head_dim, dtype=dtype, device=device)
        self.positions = torch.zeros(shape, dtype=torch.int64, device=device)
        self.valid = torch.zeros(shape, dtype=torch.bool, device=device)
        self.scores = torch.zeros(shape, dtype=torch.float32, device=device)
        self.free_blocks = list(range(blocks - 1, PAD_BLOCK, -1))  # popped from the end: low ids first

    @property
    def usable_blocks(self) -> int:
        return self.keys.shape[0] - 1

    @property
    def bytes_per_block(self) -> int:
        return (self.keys[0].numel() + self.values[0].numel()) * self.keys.element_size()

    def allocate(self, count: int) -> list[int]:
        if count > len(self.free_blocks):
            raise RuntimeError(
                f"{count} blocks asked, {len(self.free_blocks)} free (admission prevents this)"
            )
        taken = [self.free_blocks.pop() for _ in range(count)]
        self.valid[taken] = False
        return taken

    def release(self, blocks: list[int]) -> None:
        self.valid[blocks] = False
        self.free_blocks.extend(reversed(blocks))

    def read_bookkeeping(
        self, tables: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, scores: torch.Tensor
    ) -> None:
        """Copies the positions, validity and scores of the rows whose block tables are ``tables``
        (``[..., blocks]``) into dense ``[..., kv_heads, blocks * block_size]`` buffers: the decode
        batch's working copy while its membership holds (keys and values stay in the pool)."""
        for pool, rows in ((self.positions, positions), (self.valid, valid), (self.scores, scores)):
            rows.copy_(gathered(pool, tables))

    def store_bookkeeping(
        self, tables: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, scores: torch.Tensor
    ) -> None:
        """Writes a batch's bookkeeping (as :meth:`read_bookkeeping` laid it out) back to its blocks."""
        shape = (*tables.shape, self.block_size, self.kv_heads)
        for pool, rows in ((self.positions, positions), (self.valid, valid), (self.scores, scores)):
            pool[tables] = rows.transpose(-1, -2).reshape(shape)
        self.valid[PAD_BLOCK] = False  # padding rows wrote into it


@dataclass
class LayerSlots:
    """One request's layer in the pool: its blocks, its budget and the slot the next token goes to."""

    blocks: list[int]
    budget: int
    free: torch.Tensor  # [kv_heads]


def store_layer(pool: BlockPool, layer, budget: int) -> LayerSlots:
    """Copies a prefilled, compressed ``SqueezeLayer`` of one sequence into ``budget + 1`` slots of
    newly allocated blocks; returns where it lives."""
    held = layer.keys.shape[2]
    blocks = pool.allocate(blocks_for(max(budget, held) + 1, pool.block_size))
    slots, heads = len(blocks) * pool.block_size, pool.kv_heads

    def laid_out(states: torch.Tensor) -> torch.Tensor:
        """``[1, heads, held, ...]`` as the blocks hold it: ``[blocks, block_size, heads, ...]``, padded."""
        states = states[0].expand(heads, *states.shape[2:]).transpose(0, 1)
        padded = states.new_zeros(slots, *states.shape[1:])
        padded[:held] = states
        return padded.view(len(blocks), pool.block_size, *states.shape[1:])

    index = torch.tensor(blocks, device=pool.keys.device)
    for pooled, states in (
        (pool.keys, layer.keys),
        (pool.values, layer.values),
        (pool.positions, layer.positions),
        (pool.valid, layer.valid),
        (pool.scores, layer.scores),
    ):
        pooled[index] = laid_out(states)
    valid = laid_out(layer.valid).view(slots, heads).T
    return LayerSlots(blocks, budget, (~valid).to(torch.uint8).argmax(-1))
