"""The simple path and the fast engine on one batch, and what their caches keep."""

from __future__ import annotations

import torch

import squeezekv
from squeezekv import SqueezeConfig
from squeezekv.cache.ragged import RaggedStaticLayer
from squeezekv.engine import FastGenerator


def simple_and_fast(model, config: SqueezeConfig, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int):
    """``model.generate`` under ``squeezekv.compress``, then the fast engine (prefilling two sequences
    at a time): the simple path's sequences and cache, the generator and its result."""
    with squeezekv.compress(model, config, max_new_tokens=new_tokens) as session:
        simple = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False)
    generator = FastGenerator(model, config)
    fast = generator.generate(ids, mask, max_new_tokens=new_tokens, prefill_batch=2)
    return simple, session.cache, generator, fast


def kept_positions(layer, row: int, head: int) -> list[int]:
    """The positions one head of one sequence holds, whatever the layer's storage."""
    if isinstance(layer, RaggedStaticLayer):
        start, length = int(layer.segments.offsets[row, head]), int(layer.segments.lengths[row, head])
        positions, valid = layer.positions[start : start + length], layer.valid[start : start + length]
    else:  # a dense layer (one head for all, or one per head) or a packed one's padded view
        head = min(head, layer.positions.shape[1] - 1)
        positions, valid = layer.positions[row, head], layer.valid[row, head]
    return sorted(positions[valid].tolist())


def assert_same_tokens_kept(dynamic, static, rows: int, heads: int) -> None:
    """Every head of every sequence holds the same positions in both layers."""
    for row in range(rows):
        for head in range(heads):
            assert kept_positions(dynamic, row, head) == kept_positions(static, row, head), (row, head)
