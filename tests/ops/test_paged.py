"""The serving batch's paged ops: each Triton kernel against its torch twin, and the paged decode
against the contiguous decode kernel on the same tokens (the policies must see the same mass).

Without a GPU the Triton side runs in Triton's interpreter (``tests/conftest.py`` turns it on).
"""

from __future__ import annotations

import pytest
import torch

from squeezekv.ops import common, decode, paged

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BLOCK_SIZE = 16
needs_triton = pytest.mark.skipif(common.triton is None, reason="needs Triton")
needs_gpu = pytest.mark.skipif(
    DEVICE == "cpu", reason="bf16 products need a GPU (the interpreter's are wrong)"
)


def paged_batch(
    group, per_head, seed, columns=(5000, 4321, 6000), row_blocks=(33, 3, 20), dtype=torch.float32
):
    """Rows holding different numbers of blocks (one more slots than a decode program's chunk), in
    no order in a shared pool, the shorter tables padded with block 0; slots in no order, some empty,
    the padding empty; every row's query column present."""
    generator = torch.Generator().manual_seed(seed)
    batch, kv_heads, dim = len(row_blocks), 2, 32
    heads = kv_heads if per_head else 1
    width = max(row_blocks)
    slots = width * BLOCK_SIZE
    pool_blocks = sum(row_blocks) + 5
    pool_keys = torch.randn(pool_blocks, BLOCK_SIZE, kv_heads, dim, generator=generator)
    pool_values = torch.randn(pool_blocks, BLOCK_SIZE, kv_heads, dim, generator=generator)
    order = (torch.randperm(pool_blocks - 1, generator=generator) + 1).tolist()
    tables = torch.zeros(batch, width, dtype=torch.long)
    for row, count in enumerate(row_blocks):
        tables[row, :count] = torch.tensor(order[:count])
        order = order[count:]
    columns = torch.tensor(columns)
    positions = torch.stack(
        [
            torch.randperm(int(columns[row]), generator=generator)[:slots]
            for row in range(batch)
            for _ in range(heads)
        ]
    ).view(batch, heads, slots)
    valid = torch.rand(batch, heads, slots, generator=generator) > 0.3
    for row, count in enumerate(row_blocks):
        valid[row, :, count * BLOCK_SIZE :] = False  # padding: block 0's slots
        own = (count * BLOCK_SIZE) // 2
        positions[row, :, own], valid[row, :, own] = columns[row], True
    query = torch.randn(batch, kv_heads * group, 1, dim, generator=generator)
    query, pool_keys, pool_values = (tensor.to(dtype) for tensor in (query, pool_keys, pool_values))
    tensors = (query, pool_keys, pool_values, tables, positions, valid, columns)
    return [tensor.to(DEVICE) for tensor in tensors]


@needs_triton
@pytest.mark.parametrize(
    ("group", "per_head", "window", "mass"),
    [
        (1, False, None, "none"),
        (2, True, None, "returned"),
        (4, False, 300, "added"),
        (2, True, 300, "returned"),
    ],
)
def test_paged_decode_triton_matches_its_torch_twin(group, per_head, window, mass):
    """Each row its own column: the window differs per row (rows within one program's chunk: the
    test below covers several)."""
    arguments = paged_batch(group, per_head, seed=group, row_blocks=(13, 3, 9))
    running = torch.rand(3, 2, arguments[4].shape[-1], device=DEVICE)
    results = []
    for side in (paged.paged_decode_attention_torch, paged.paged_decode_attention_triton):
        added = running.clone() if mass == "added" else None
        output, returned = side(*arguments, window, 0.2, mass != "none", added)
        results.append((output, returned, added))
    (want, want_mass, want_added), (got, got_mass, got_added) = results
    close = dict(atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got, want, **close)
    if mass == "returned":
        torch.testing.assert_close(got_mass, want_mass, **close)
    else:
        assert got_mass is None and want_mass is None
    if mass == "added":
        torch.testing.assert_close(got_added, want_added, **close)


@needs_triton
@pytest.mark.parametrize(
    ("group", "per_head", "window", "dtype"),
    [(2, True, 300, torch.float32), pytest.param(4, False, None, torch.bfloat16, marks=needs_gpu)],
)
def test_paged_decode_is_the_contiguous_kernel_on_the_gathered_rows(group, per_head, window, dtype):
    """The same sums in the same order, only the addresses differ (one column for all rows, as the
    contiguous kernel takes): bit for bit in float32. With bf16 inputs the two compiled kernels may
    multiply on different tensor-core instructions (seen on an H200: the float32 mass then differs in
    its last bits while the bf16 output is equal), so there the mass is compared to float32 rounding."""
    arguments = paged_batch(group, per_head, seed=10 + group, columns=(5000, 5000, 5000), dtype=dtype)
    query, pool_keys, pool_values, tables, positions, valid, _ = arguments
    column = torch.tensor([5000], device=DEVICE)
    got = paged.paged_decode_attention_triton(
        query, pool_keys, pool_values, tables, positions, valid, column.expand(3), window, 0.2, True
    )
    keys, values = paged.gathered(pool_keys, tables), paged.gathered(pool_values, tables)
    want = decode.decode_attention_triton(query, keys, values, positions, valid, column, window, 0.2, True)
    assert torch.equal(got[0], want[0])
    if dtype == torch.float32:
        assert torch.equal(got[1], want[1])
    else:
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-7)


def test_the_torch_twin_attends_each_rows_own_tokens():
    """Against plain softmax attention over each row's valid slots, read block by block."""
    query, pool_keys, pool_values, tables, positions, valid, columns = paged_batch(2, False, seed=3)
    output, mass = paged.paged_decode_attention(
        query, pool_keys, pool_values, tables, positions, valid, columns, None, 0.2, True
    )
    for row in range(3):
        kept = valid[row, 0].nonzero().flatten()
        blocks, offsets = tables[row, kept // BLOCK_SIZE], kept % BLOCK_SIZE
        keys, values = pool_keys[blocks, offsets], pool_values[blocks, offsets]  # [kept, kv_heads, dim]
        for head in range(4):
            weights = torch.softmax(0.2 * keys[:, head // 2] @ query[row, head, 0], 0)
            torch.testing.assert_close(output[row, head, 0], weights @ values[:, head // 2])
        assert mass[row, :, ~valid[row, 0]].abs().max() == 0
        torch.testing.assert_close(mass[row].sum(-1), torch.full((2,), 2.0, device=DEVICE))


@needs_triton
@pytest.mark.parametrize("per_head", [False, True])
def test_paged_write_triton_matches_its_torch_twin_and_fills_each_free_slot(per_head):
    query, pool_keys, pool_values, tables, positions, valid, columns = paged_batch(1, per_head, seed=4)
    generator = torch.Generator().manual_seed(4)
    new = torch.randn(3, 1, 2, 64, generator=generator).transpose(1, 2).to(DEVICE)  # strided views
    key, value = new[..., :32], new[..., 32:]
    heads = positions.shape[1]
    free = torch.stack(
        [torch.randint(0, count * BLOCK_SIZE, (heads,), generator=generator) for count in (33, 3, 20)]
    )
    scores = torch.rand(valid.shape, device=DEVICE)
    state = (pool_keys, pool_values, tables, positions, valid, scores)
    sides = []
    for side in (paged.write_paged_slot_torch, paged.write_paged_slot_triton):
        copies = [tensor.clone() for tensor in state]
        side(key, value, *copies, free.to(DEVICE), columns)
        sides.append(copies)
    for want, got in zip(*sides, strict=True):
        assert torch.equal(got, want)
    pool_keys, _, _, positions, valid, scores = sides[0]
    for row in range(3):
        for kv_head in range(2):
            slot = int(free[row, kv_head if per_head else 0])
            block = tables[row, slot // BLOCK_SIZE]
            assert torch.equal(pool_keys[block, slot % BLOCK_SIZE, kv_head], key[row, kv_head, 0])
        for head in range(heads):
            slot = int(free[row, head])
            assert positions[row, head, slot] == columns[row] and valid[row, head, slot]
            assert scores[row, head, slot] == 0
