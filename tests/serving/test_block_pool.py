"""The block pool: blocks handed out once, gathered into per-row buffers and written back."""

import pytest
import torch

from squeezekv.serving.store import PAD_BLOCK, BlockPool, blocks_for


def test_gather_scatter_and_write_follow_each_rows_block_table():
    pool = BlockPool(6, 2, kv_heads=2, head_dim=3, dtype=torch.float32, device=torch.device("cpu"))
    first, second = pool.allocate(2), pool.allocate(1)
    assert PAD_BLOCK not in first + second and len(set(first + second)) == 3
    tables = torch.tensor([first, second + [PAD_BLOCK]])
    free = torch.tensor([[3, 3], [1, 0]])  # per row and key head: the slot the new token goes to
    key = torch.arange(12.0).view(2, 2, 1, 3)
    pool.write(tables, free, key, -key, torch.tensor([7, 9]))
    keys, values, positions, valid, scores = pool.gather(tables)
    assert keys.shape == (2, 2, 4, 3) and torch.equal(values, -keys)
    assert torch.equal(keys[0, :, 3], key[0, :, 0]) and torch.equal(keys[1, 0, 1], key[1, 0, 0])
    assert valid.sum().item() == 4 and positions[0, 1, 3].item() == 7 and positions[1, 1, 0].item() == 9
    valid[0, :, 3] = False
    pool.scatter(tables, valid, scores + 1)
    assert not pool.valid[first[1]].any() and not pool.valid[PAD_BLOCK].any()
    assert pool.scores[second[0], 1, 0].item() == 1.0
    pool.release(first)
    assert len(pool.free_blocks) == 4
    with pytest.raises(RuntimeError, match="5 blocks asked, 4 free"):
        pool.allocate(5)


def test_blocks_round_up():
    assert [blocks_for(slots, 16) for slots in (1, 16, 17, 33)] == [1, 1, 2, 3]
