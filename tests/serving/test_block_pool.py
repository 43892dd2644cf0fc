"""The block pool: blocks handed out once, a batch's bookkeeping gathered into dense rows and back;
the arena the batch's static buffers are views of."""

import pytest
import torch

from squeezekv.serving.batch import Arena, bucket
from squeezekv.serving.store import PAD_BLOCK, BlockPool, blocks_for


def test_bookkeeping_moves_to_dense_rows_and_back_through_each_rows_block_table():
    pool = BlockPool(6, 2, kv_heads=2, head_dim=3, dtype=torch.float32, device=torch.device("cpu"))
    first, second = pool.allocate(2), pool.allocate(1)
    assert PAD_BLOCK not in first + second and len(set(first + second)) == 3
    pool.positions[first[1], 1, 0], pool.valid[first[1], 1, 0] = 7, True  # row 0, head 0, slot 3
    pool.valid[second[0], 0, 1] = True  # row 1, head 1, slot 0
    tables = torch.tensor([first, second + [PAD_BLOCK]])
    positions, scores = torch.zeros(2, 2, 4, dtype=torch.long), torch.zeros(2, 2, 4)
    valid = torch.ones(2, 2, 4, dtype=torch.bool)
    pool.read_bookkeeping(tables, positions, valid, scores)
    assert positions[0, 0, 3] == 7 and valid[0, 0, 3] and valid[1, 1, 0] and valid.sum() == 2
    assert not valid[1, :, 2:].any()  # the padding block reads as empty
    valid[0, 0, 3], valid[1, :, 2:] = False, True  # a padding row writes into block 0
    positions[1, 0, 1] = 9
    pool.store_bookkeeping(tables, positions, valid, scores + 1)
    assert not pool.valid[first[1]].any() and not pool.valid[PAD_BLOCK].any()
    assert pool.positions[second[0], 1, 0] == 9 and pool.scores[second[0], 1, 0] == 1.0
    pool.release(first)
    assert len(pool.free_blocks) == 4
    with pytest.raises(RuntimeError, match="5 blocks asked, 4 free"):
        pool.allocate(5)


def test_blocks_round_up():
    assert [blocks_for(slots, 16) for slots in (1, 16, 17, 33)] == [1, 1, 2, 3]


def test_buckets_are_powers_of_two_and_share_the_arenas_storage():
    assert [bucket(count) for count in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 16]
    arena = Arena(torch.device("cpu"))
    large = arena.take("tables.0", (8, 4), torch.long)
    generation = arena.generation
    small = arena.take("tables.0", (2, 4), torch.long)
    assert small.data_ptr() == large.data_ptr() and arena.generation == generation  # same addresses
    grown = arena.take("tables.0", (16, 4), torch.long)
    assert arena.generation == generation + 1 and grown.shape == (16, 4)
