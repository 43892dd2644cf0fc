"""The serving batch's decode ops over a pool of fixed-size blocks that every row and layer shares.

A row's keys and values live in the blocks its block table lists (``tables``: ``[batch, width]``
block ids, a shorter row padded with a block it never marks valid); its slot ``s`` is slot
``s % block_size`` of block ``tables[row, s // block_size]``. The bookkeeping the policies rank
(positions, validity, scores: ``[batch, heads, width * block_size]``) is small and stays one
dense buffer per layer, so eviction is :func:`~squeezekv.ops.evict_lowest` unchanged; only the keys
and values, read every step, stay in the pool and are read there.

| op | what it does |
|---|---|
| :func:`paged_decode_attention` | :func:`~squeezekv.ops.decode_attention` over each row's blocks |
| :func:`write_paged_slot` | :func:`~squeezekv.ops.write_slot`, the keys and values written into the pool |

Each row has its own column (rows are at different points of their answers).

The Triton decode kernel is :mod:`~squeezekv.ops.decode`'s first pass with the key and value
addresses looked up in the block table, a column per row (for the sliding window), loads of only
the slots that hold a token (a row shorter than the batch's widest costs no bandwidth for its
padding) and a loop that stops at the last slot; the second pass, which turns the partial softmax
states into the output and the mass, is shared as it is. The skipped work adds exactly nothing, so
in float32 the output and the mass are bit for bit those of the contiguous kernel on the gathered
rows (with bf16 inputs the compiler may pick other tensor-core instructions, and the float32 mass
can then differ in its last bits).
"""

from __future__ import annotations

import torch

from squeezekv.ops.attention import fused
from squeezekv.ops.common import dot, tl, triton, use_triton
from squeezekv.ops.decode import (
    DECODE_BLOCK,
    DECODE_CHUNK,
    DECODE_WARPS,
    DecodePartials,
    decode_attention_torch,
)
from squeezekv.ops.slots import record_written_slot

if triton is not None:
    from squeezekv.ops.decode import (  # the contiguous pass's own steps
        _group_query,
        _softmax_step,
        _store_partials,
    )

    @triton.jit
    def _paged_decode_chunk(
        Q, K, V, TABLES, P, A, COLUMNS, SCORES, PART_MAX, PART_SUM, PART_ACC,
        sqb, sqh, sqd,
        skb, skn, skh, skd,
        svb, svn, svh, svd,
        stb, stw, scb,
        spb, sph, spn,
        keys, q_heads, kv_heads, splits, window, scale,
        HAS_WINDOW: tl.constexpr, WITH_MASS: tl.constexpr, POSITION_HEADS: tl.constexpr,
        DIM: tl.constexpr, GROUP: tl.constexpr, GM: tl.constexpr, CHUNK: tl.constexpr,
        BN: tl.constexpr, IEEE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    ):  # fmt: skip
        split, batch_head = tl.program_id(0), tl.program_id(1)
        batch, kv_head = batch_head // kv_heads, batch_head % kv_heads
        position_head = kv_head if POSITION_HEADS > 1 else 0
        in_group, rows, dims, q, best, total, acc = _group_query(
            Q, sqb, sqh, sqd, batch, kv_head, q_heads, GROUP, GM, DIM
        )
        if HAS_WINDOW:
            oldest = tl.load(COLUMNS + batch * scb) - window
        for offset in range(0, tl.minimum(CHUNK, keys - split * CHUNK), BN):  # blocks past the keys add 0
            cols = split * CHUNK + offset + tl.arange(0, BN)
            inside = cols < keys
            base = batch * spb + position_head * sph + cols * spn
            seen = tl.load(A + base, mask=inside, other=0) != 0
            if HAS_WINDOW:
                seen = seen & (tl.load(P + base, mask=inside, other=0) > oldest)
            block = tl.load(TABLES + batch * stb + (cols // BLOCK_SIZE) * stw, mask=inside, other=0)
            k_base = block.to(tl.int64) * skb + (cols % BLOCK_SIZE) * skn + kv_head * skh
            v_base = block.to(tl.int64) * svb + (cols % BLOCK_SIZE) * svn + kv_head * svh
            # only the slots that hold a token are read: a short row's padding costs no bandwidth
            k = tl.load(K + k_base[:, None] + dims[None, :] * skd, mask=seen[:, None], other=0.0)
            scores = dot(q, tl.trans(k), IEEE) * scale
            scores = tl.where(seen[None, :], scores, float("-inf"))
            if WITH_MASS:
                tl.store(SCORES + rows[:, None] * keys + cols[None, :], scores,
                         mask=in_group[:, None] & inside[None, :])  # fmt: skip
            v = tl.load(V + v_base[:, None] + dims[None, :] * svd, mask=seen[:, None], other=0.0)
            best, total, acc = _softmax_step(scores, v, best, total, acc, IEEE)
        _store_partials(
            PART_MAX, PART_SUM, PART_ACC, rows * splits + split, best, total, acc, in_group, dims, DIM
        )

    @triton.jit
    def _write_paged_slot(
        KEY, VALUE, POOL_KEYS, POOL_VALUES, TABLES, POSITIONS, VALID, SCORES, FREE, COLUMNS,
        skb, skh, skd, svb, svh, svd,
        sKb, sKn, sKh, sKd, sVb, sVn, sVh, sVd, stb, stw, scb,
        spb, sph, sps, sab, sah, sas, ssb, ssh, sss,
        kv_heads, heads,
        DIM: tl.constexpr, VALUE_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0)
        batch, kv_head = row // kv_heads, row % kv_heads
        head = kv_head if heads > 1 else 0
        slot = tl.load(FREE + batch * heads + head)
        block = tl.load(TABLES + batch * stb + (slot // BLOCK_SIZE) * stw).to(tl.int64)
        offset = slot % BLOCK_SIZE
        dims = tl.arange(0, DIM)
        key = tl.load(KEY + batch * skb + kv_head * skh + dims * skd)
        tl.store(POOL_KEYS + block * sKb + offset * sKn + kv_head * sKh + dims * sKd, key)
        dims = tl.arange(0, VALUE_DIM)
        value = tl.load(VALUE + batch * svb + kv_head * svh + dims * svd)
        tl.store(POOL_VALUES + block * sVb + offset * sVn + kv_head * sVh + dims * sVd, value)
        if kv_head < heads:  # one program per bookkeeping row
            tl.store(POSITIONS + batch * spb + head * sph + slot * sps, tl.load(COLUMNS + batch * scb))
            tl.store(VALID + batch * sab + head * sah + slot * sas, 1)
            tl.store(SCORES + batch * ssb + head * ssh + slot * sss, 0.0)


def gathered(pool: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """``pool`` (``[blocks, block_size, heads, ...]``) read through ``tables`` (``[..., width]``) as
    one buffer per row, ``[..., heads, width * block_size, ...]``: a copy (the torch twins' transient
    one, or the serving batch's bookkeeping when it is built)."""
    lead, width = tables.shape[:-1], tables.shape[-1]
    picked = pool[tables].view(*lead, width * pool.shape[1], *pool.shape[2:])
    return picked.transpose(len(lead), len(lead) + 1)


def paged_decode_attention(
    query: torch.Tensor,
    pool_keys: torch.Tensor,
    pool_values: torch.Tensor,
    tables: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor,
    columns: torch.Tensor,
    sliding_window: int | None,
    scaling: float,
    with_mass: bool,
    add_mass_to: torch.Tensor | None = None,
    softcap: float | None = None,
    explicit: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One decode query per row over the blocks its table lists.

    ``query`` is ``[batch, q_heads, 1, dim]``; ``pool_keys``/``pool_values`` ``[blocks, block_size,
    kv_heads, dim]``; ``tables`` ``[batch, width]``; ``positions``/``valid`` (``[batch, 1 or
    kv_heads, width * block_size]``) describe each row's slots, which must include the query's own
    token; ``columns`` (``[batch]``) is each row's query column, used only for a sliding window.
    Returns what :func:`~squeezekv.ops.decode_attention` returns on the rows' gathered buffers
    (the output, and the mass ``[batch, kv_heads, slots]`` if ``with_mass``, or added in place to
    ``add_mass_to``). The Triton kernels serve it where :func:`squeezekv.ops.attention.fused` allows.
    """
    if fused(query, softcap, explicit):
        return paged_decode_attention_triton(
            query, pool_keys, pool_values, tables, positions, valid, columns, sliding_window, scaling,
            with_mass, add_mass_to,
        )  # fmt: skip
    return paged_decode_attention_torch(
        query, pool_keys, pool_values, tables, positions, valid, columns, sliding_window, scaling,
        with_mass, add_mass_to, softcap, explicit,
    )  # fmt: skip


def paged_decode_attention_torch(
    query: torch.Tensor,
    pool_keys: torch.Tensor,
    pool_values: torch.Tensor,
    tables: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor,
    columns: torch.Tensor,
    sliding_window: int | None,
    scaling: float,
    with_mass: bool,
    add_mass_to: torch.Tensor | None = None,
    softcap: float | None = None,
    explicit: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The torch twin of :func:`paged_decode_attention_triton` (same arguments, same result): the
    rows' blocks gathered into a transient copy of the layer, attended as the contiguous twin does."""
    return decode_attention_torch(
        query, gathered(pool_keys, tables), gathered(pool_values, tables), positions, valid,
        columns.view(-1, 1, 1), sliding_window, scaling, with_mass, add_mass_to, softcap, explicit,
    )  # fmt: skip


def paged_decode_attention_triton(
    query: torch.Tensor,
    pool_keys: torch.Tensor,
    pool_values: torch.Tensor,
    tables: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor,
    columns: torch.Tensor,
    sliding_window: int | None,
    scaling: float,
    with_mass: bool,
    add_mass_to: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The Triton pair behind :func:`paged_decode_attention`: the paged first pass, then
    :mod:`~squeezekv.ops.decode`'s combine."""
    batch, q_heads, _, dim = query.shape
    block_size, kv_heads = pool_keys.shape[1], pool_keys.shape[2]
    keys = positions.shape[-1]
    group = q_heads // kv_heads
    partials = DecodePartials.for_query(query, kv_heads, keys, with_mass, add_mass_to)
    splits, scores, part_max, part_sum, part_acc = partials[:5]
    valid = valid.view(torch.int8) if valid.dtype == torch.bool else valid
    _paged_decode_chunk[(splits, batch * kv_heads)](
        query, pool_keys, pool_values, tables, positions, valid, columns, scores, part_max, part_sum,
        part_acc,
        query.stride(0), query.stride(1), query.stride(3),
        *pool_keys.stride(), *pool_values.stride(), *tables.stride(), columns.stride(0), *positions.stride(),
        keys, q_heads, kv_heads, splits, sliding_window or 0, scaling,
        HAS_WINDOW=sliding_window is not None, WITH_MASS=with_mass, POSITION_HEADS=positions.shape[1],
        DIM=dim, GROUP=group, GM=max(16, triton.next_power_of_2(group)), CHUNK=DECODE_CHUNK,
        BN=DECODE_BLOCK, IEEE=query.dtype == torch.float32, BLOCK_SIZE=block_size, num_warps=DECODE_WARPS,
    )  # fmt: skip
    return partials.combine(kv_heads, keys, add_mass_to)


def write_paged_slot(
    key: torch.Tensor,
    value: torch.Tensor,
    pool_keys: torch.Tensor,
    pool_values: torch.Tensor,
    tables: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor,
    scores: torch.Tensor,
    free: torch.Tensor,
    columns: torch.Tensor,
) -> None:
    """Writes each row's new token (``key``/``value``: ``[batch, kv_heads, 1, dim]``) into its slot
    ``free`` (``[batch, 1 or kv_heads]``, contiguous; an index into the row's slots): the key and
    value into the pool's block that ``tables`` names, and, in the row's bookkeeping, position
    ``columns`` (``[batch]``), valid and score 0."""
    write = write_paged_slot_triton if use_triton(pool_keys) else write_paged_slot_torch
    write(key, value, pool_keys, pool_values, tables, positions, valid, scores, free, columns)


def write_paged_slot_torch(
    key: torch.Tensor,
    value: torch.Tensor,
    pool_keys: torch.Tensor,
    pool_values: torch.Tensor,
    tables: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor,
    scores: torch.Tensor,
    free: torch.Tensor,
    columns: torch.Tensor,
) -> None:
    """The torch twin of :func:`write_paged_slot_triton` (same arguments, same result)."""
    block_size, kv_heads = pool_keys.shape[1], key.shape[1]
    kv_free = free.expand(-1, kv_heads)
    blocks, offsets = tables.gather(1, kv_free // block_size), kv_free % block_size
    heads = torch.arange(kv_heads, device=free.device).expand_as(kv_free)
    pool_keys[blocks, offsets, heads] = key[:, :, 0]
    pool_values[blocks, offsets, heads] = value[:, :, 0]
    record_written_slot(positions, valid, scores, free, columns.view(-1, 1, 1))


def write_paged_slot_triton(
    key: torch.Tensor,
    value: torch.Tensor,
    pool_keys: torch.Tensor,
    pool_values: torch.Tensor,
    tables: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor,
    scores: torch.Tensor,
    free: torch.Tensor,
    columns: torch.Tensor,
) -> None:
    """The Triton kernel behind :func:`write_paged_slot`: one launch per layer."""
    flags = valid.view(torch.int8)
    batch, kv_heads = key.shape[:2]
    _write_paged_slot[(batch * kv_heads,)](
        key, value, pool_keys, pool_values, tables, positions, flags, scores, free, columns,
        key.stride(0), key.stride(1), key.stride(3), value.stride(0), value.stride(1), value.stride(3),
        *pool_keys.stride(), *pool_values.stride(), *tables.stride(), columns.stride(0),
        *positions.stride(), *flags.stride(), *scores.stride(), kv_heads, positions.shape[1],
        DIM=pool_keys.shape[-1], VALUE_DIM=pool_values.shape[-1], BLOCK_SIZE=pool_keys.shape[1],
    )  # fmt: skip
