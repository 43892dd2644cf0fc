"""Triton kernels: attention over a layer's cached tokens together with each key's attention mass.

H2O and SnapKV need, at prefill, how much attention every key receives. The plain path
(:func:`squeezekv.attention.attend`) materialises the probabilities in query chunks, which costs
several passes over a ``queries x keys`` matrix. Here two kernels keep that matrix on chip:

1. a flash-attention forward over the layer's keys, with the layer's own visibility rule (real
   tokens, causal by column, optional sliding window), writing the output and each row's
   log-sum-exp;
2. a pass per block of keys that recomputes the scores of the scored queries, normalises them with
   the stored log-sum-exp and sums them over queries and over the query heads sharing the key head.

The new tokens are the last keys and keys are kept in column order, so a query sees no key after
its own index; blocks past that are skipped.

A decode step (one query per sequence, over the fast engine's buffer, whose slots are in no
order) has its own pair, split over the keys as flash-decoding is, so that short batches still
fill the GPU:

3. each program takes one key head, the query heads sharing it (as the rows of a matrix product,
   padded to 16) and one chunk of slots; it writes the chunk's partial softmax state and, when the
   mass is wanted, the raw scores;
4. a pass per block of slots combines the chunks' states into each head's normaliser, turns the
   stored scores into probabilities summed over the group, and (first block only) the output.

Layer importance has its own kernel (6): the cosine between each token's residual and residual
plus attention output, in float32, reading both once instead of materialising float32 copies.

Two more serve the fast engine's bookkeeping, each in one launch per layer: writing the new token
into its free slot (keys, values, position, validity, score), and eviction (5), a single pass per
row in which the lowest-priority valid slot (ties: the oldest token) leaves if the row is over its
budget and the next free slot is found.

Tests check every kernel against the plain path.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU-only install has no Triton; the plain path serves it
    triton = None

BLOCK_M = 64
BLOCK_N = 64
DECODE_CHUNK = 512  # slots per decode program
DECODE_BLOCK = 64  # slots per step of a decode program's loop
DECODE_WARPS = 4
DECODE_MASS_BLOCK = 256  # slots per program of the decode combine's attention-mass part
DECODE_MASS_WARPS = 1  # measured on an H100: more warps per program slowed the mass down


def available(query: torch.Tensor) -> bool:
    """Whether the kernels can serve this query: Triton present, a power-of-two head size >= 16, and
    16- or 32-bit floats (they accumulate in float32, which would round a float64 model)."""
    dim = query.shape[-1]
    floats = (torch.float16, torch.bfloat16, torch.float32)
    return triton is not None and dim >= 16 and dim & (dim - 1) == 0 and query.dtype in floats


if triton is not None:

    @triton.jit
    def _visible(positions, valid, columns, window, HAS_WINDOW: tl.constexpr):
        seen = (valid[None, :] != 0) & (positions[None, :] <= columns[:, None])
        if HAS_WINDOW:
            seen = seen & (positions[None, :] > columns[:, None] - window)
        return seen | (positions[None, :] == columns[:, None])

    @triton.jit
    def _forward(
        Q, K, V, P, A, OUT, LSE,
        sqb, sqh, sqm, sqd,
        skb, skh, skn, skd,
        svb, svh, svn, svd,
        spb, sph, spn,
        sob, soh, som, sod,
        queries, keys, q_heads, group, first_column, window, scale,
        HAS_WINDOW: tl.constexpr, POSITION_HEADS: tl.constexpr, DIM: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        block, batch_head = tl.program_id(0), tl.program_id(1)
        batch, head = batch_head // q_heads, batch_head % q_heads
        kv_head = head // group
        position_head = kv_head if POSITION_HEADS > 1 else 0
        rows = block * BM + tl.arange(0, BM)
        dims = tl.arange(0, DIM)
        q = tl.load(Q + batch * sqb + head * sqh + rows[:, None] * sqm + dims[None, :] * sqd,
                    mask=rows[:, None] < queries, other=0.0)  # fmt: skip
        columns = first_column + rows
        best = tl.full([BM], float("-inf"), tl.float32)
        total = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, DIM], tl.float32)
        for start in range(0, keys - queries + (block + 1) * BM, BN):  # no later key is seen
            cols = start + tl.arange(0, BN)
            inside = cols < keys
            k = tl.load(K + batch * skb + kv_head * skh + cols[:, None] * skn + dims[None, :] * skd,
                        mask=inside[:, None], other=0.0)  # fmt: skip
            v = tl.load(V + batch * svb + kv_head * svh + cols[:, None] * svn + dims[None, :] * svd,
                        mask=inside[:, None], other=0.0)  # fmt: skip
            base = batch * spb + position_head * sph + cols * spn
            positions = tl.load(P + base, mask=inside, other=0)
            valid = tl.load(A + base, mask=inside, other=0)
            if IEEE:
                scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            else:
                scores = tl.dot(q, tl.trans(k)) * scale
            seen = _visible(positions, valid, columns, window, HAS_WINDOW) & inside[None, :]
            scores = tl.where(seen, scores, float("-inf"))
            new_best = tl.maximum(best, tl.max(scores, 1))
            safe = tl.where(new_best == float("-inf"), 0.0, new_best)
            p = tl.exp(scores - safe[:, None])
            rescale = tl.exp(best - safe)
            total = total * rescale + tl.sum(p, 1)
            if IEEE:
                acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v)
            best = new_best
        out = acc / total[:, None]
        tl.store(OUT + batch * sob + head * soh + rows[:, None] * som + dims[None, :] * sod,
                 out.to(OUT.dtype.element_ty), mask=rows[:, None] < queries)  # fmt: skip
        tl.store(LSE + batch_head * queries + rows, best + tl.log(total), mask=rows < queries)

    @triton.jit
    def _mass(
        Q, K, P, A, LSE, W, M,
        sqb, sqh, sqm, sqd,
        skb, skh, skn, skd,
        spb, sph, spn,
        queries, keys, q_heads, kv_heads, group, first_column, first_scored, window, scale,
        HAS_WINDOW: tl.constexpr, POSITION_HEADS: tl.constexpr, DIM: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        block, batch_head = tl.program_id(0), tl.program_id(1)
        batch, kv_head = batch_head // kv_heads, batch_head % kv_heads
        position_head = kv_head if POSITION_HEADS > 1 else 0
        cols = block * BN + tl.arange(0, BN)
        inside = cols < keys
        dims = tl.arange(0, DIM)
        k = tl.load(K + batch * skb + kv_head * skh + cols[:, None] * skn + dims[None, :] * skd,
                    mask=inside[:, None], other=0.0)  # fmt: skip
        base = batch * spb + position_head * sph + cols * spn
        positions = tl.load(P + base, mask=inside, other=0)
        valid = tl.load(A + base, mask=inside, other=0)
        mass = tl.zeros([BN], tl.float32)
        start_row = tl.maximum(first_scored, block * BN - (keys - queries))  # earlier rows see none
        start_row = (start_row // BM) * BM
        for g in range(0, group):
            head = kv_head * group + g
            for start in range(start_row, queries, BM):
                rows = start + tl.arange(0, BM)
                in_rows = rows < queries
                q = tl.load(Q + batch * sqb + head * sqh + rows[:, None] * sqm + dims[None, :] * sqd,
                            mask=in_rows[:, None], other=0.0)  # fmt: skip
                lse = tl.load(LSE + (batch * q_heads + head) * queries + rows, mask=in_rows, other=0.0)
                weight = tl.load(W + batch * queries + rows, mask=in_rows, other=0.0)
                if IEEE:
                    scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
                else:
                    scores = tl.dot(q, tl.trans(k)) * scale
                seen = _visible(positions, valid, first_column + rows, window, HAS_WINDOW) & inside[None, :]
                p = tl.where(seen, tl.exp(scores - lse[:, None]), 0.0)
                mass += tl.sum(p * weight[:, None], 0)
        tl.store(M + batch_head * keys + cols, mass, mask=inside)


def attend_scored(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor,
    first_column: int,
    sliding_window: int | None,
    scaling: float,
    row_weight: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output ``[batch, q_heads, queries, dim]`` and mass ``[batch, kv_heads, keys]``.

    ``positions``/``valid`` (``[batch, 1 or kv_heads, keys]``) describe the cached keys, whose last
    ``queries`` are the new tokens at columns ``first_column, first_column + 1, ...``;
    ``row_weight`` (``[batch, queries]``) weighs each query's contribution to the mass.
    """
    batch, q_heads, queries, dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    group = q_heads // kv_heads
    positions = positions.contiguous()
    valid = valid.to(torch.int8).contiguous()
    weight = row_weight.to(torch.float32).contiguous()
    output = torch.empty_like(query)
    lse = torch.empty(batch * q_heads * queries, dtype=torch.float32, device=query.device)
    mass = torch.empty(batch, kv_heads, keys, dtype=torch.float32, device=query.device)
    window = sliding_window if sliding_window is not None else 0
    common = dict(
        HAS_WINDOW=sliding_window is not None,
        POSITION_HEADS=positions.shape[1],
        DIM=dim,
        BM=BLOCK_M,
        BN=BLOCK_N,
        IEEE=query.dtype == torch.float32,
    )
    _forward[(math.ceil(queries / BLOCK_M), batch * q_heads)](
        query, key, value, positions, valid, output, lse,
        *query.stride(), *key.stride(), *value.stride(), *positions.stride(), *output.stride(),
        queries, keys, q_heads, group, first_column, window, scaling, **common,
    )  # fmt: skip
    scored_from = int((weight != 0).any(0).nonzero()[0]) if bool((weight != 0).any()) else queries
    _mass[(math.ceil(keys / BLOCK_N), batch * kv_heads)](
        query, key, positions, valid, lse, weight, mass,
        *query.stride(), *key.stride(), *positions.stride(),
        queries, keys, q_heads, kv_heads, group, first_column, scored_from, window, scaling, **common,
    )  # fmt: skip
    return output, mass


if triton is not None:

    @triton.jit
    def _decode_chunk(
        Q, K, V, P, A, COLUMN, SCORES, PART_MAX, PART_SUM, PART_ACC,
        sqb, sqh, sqd,
        skb, skh, skn, skd,
        svb, svh, svn, svd,
        spb, sph, spn,
        keys, q_heads, kv_heads, splits, window, scale,
        HAS_WINDOW: tl.constexpr, WITH_MASS: tl.constexpr, POSITION_HEADS: tl.constexpr,
        DIM: tl.constexpr, GROUP: tl.constexpr, GM: tl.constexpr, CHUNK: tl.constexpr,
        BN: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        split, batch_head = tl.program_id(0), tl.program_id(1)
        batch, kv_head = batch_head // kv_heads, batch_head % kv_heads
        position_head = kv_head if POSITION_HEADS > 1 else 0
        members = tl.arange(0, GM)
        in_group = members < GROUP
        rows = batch * q_heads + kv_head * GROUP + members
        dims = tl.arange(0, DIM)
        q = tl.load(Q + batch * sqb + (kv_head * GROUP + members[:, None]) * sqh + dims[None, :] * sqd,
                    mask=in_group[:, None], other=0.0)  # fmt: skip
        best = tl.full([GM], float("-inf"), tl.float32)
        total = tl.zeros([GM], tl.float32)
        acc = tl.zeros([GM, DIM], tl.float32)
        if HAS_WINDOW:
            oldest = tl.load(COLUMN) - window
        for offset in range(0, CHUNK, BN):
            cols = split * CHUNK + offset + tl.arange(0, BN)
            inside = cols < keys
            base = batch * spb + position_head * sph + cols * spn
            seen = tl.load(A + base, mask=inside, other=0) != 0
            if HAS_WINDOW:
                seen = seen & (tl.load(P + base, mask=inside, other=0) > oldest)
            k = tl.load(K + batch * skb + kv_head * skh + cols[:, None] * skn + dims[None, :] * skd,
                        mask=inside[:, None], other=0.0)  # fmt: skip
            if IEEE:
                scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            else:
                scores = tl.dot(q, tl.trans(k)) * scale
            scores = tl.where(seen[None, :], scores, float("-inf"))
            if WITH_MASS:
                tl.store(SCORES + rows[:, None] * keys + cols[None, :], scores,
                         mask=in_group[:, None] & inside[None, :])  # fmt: skip
            new_best = tl.maximum(best, tl.max(scores, 1))
            safe = tl.where(new_best == float("-inf"), 0.0, new_best)
            p = tl.exp(scores - safe[:, None])
            rescale = tl.exp(best - safe)
            v = tl.load(V + batch * svb + kv_head * svh + cols[:, None] * svn + dims[None, :] * svd,
                        mask=inside[:, None], other=0.0)  # fmt: skip
            total = total * rescale + tl.sum(p, 1)
            if IEEE:
                acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v)
            best = new_best
        part = rows * splits + split
        tl.store(PART_MAX + part, best, mask=in_group)
        tl.store(PART_SUM + part, total, mask=in_group)
        tl.store(PART_ACC + part[:, None] * DIM + dims[None, :], acc, mask=in_group[:, None])

    @triton.jit
    def _decode_combine(
        SCORES, PART_MAX, PART_SUM, PART_ACC, OUT, MASS,
        sob, soh, sod, smb, smh, sms,
        keys, q_heads, kv_heads, splits,
        WITH_MASS: tl.constexpr, ADD_MASS: tl.constexpr, DIM: tl.constexpr, GROUP: tl.constexpr,
        GP: tl.constexpr, SP: tl.constexpr, BN: tl.constexpr,
    ):  # fmt: skip
        block, batch_head = tl.program_id(0), tl.program_id(1)
        batch, kv_head = batch_head // kv_heads, batch_head % kv_heads
        members = tl.arange(0, GP)
        in_group = members < GROUP
        rows = batch * q_heads + kv_head * GROUP + members
        chunks = tl.arange(0, SP)
        parts = rows[:, None] * splits + chunks[None, :]
        in_parts = in_group[:, None] & (chunks[None, :] < splits)
        chunk_best = tl.load(PART_MAX + parts, mask=in_parts, other=float("-inf"))
        best = tl.max(chunk_best, 1)
        safe = tl.where(best == float("-inf"), 0.0, best)
        weights = tl.exp(chunk_best - safe[:, None])
        total = tl.sum(tl.load(PART_SUM + parts, mask=in_parts, other=0.0) * weights, 1)
        if block == 0:
            dims = tl.arange(0, DIM)
            acc = tl.zeros([GP, DIM], tl.float32)
            for chunk in range(0, SP):
                part = rows * splits + chunk
                present = in_group & (members * 0 + chunk < splits)  # Triton 3.9 rejects a Python-bool mask
                weight = tl.exp(tl.load(PART_MAX + part, mask=present, other=float("-inf")) - safe)
                acc += weight[:, None] * tl.load(PART_ACC + part[:, None] * DIM + dims[None, :],
                                                 mask=present[:, None], other=0.0)  # fmt: skip
            out = acc / total[:, None]
            tl.store(OUT + batch * sob + (kv_head * GROUP + members[:, None]) * soh + dims[None, :] * sod,
                     out.to(OUT.dtype.element_ty), mask=in_group[:, None])  # fmt: skip
        if WITH_MASS:
            cols = block * BN + tl.arange(0, BN)
            inside = cols < keys
            scores = tl.load(SCORES + rows[:, None] * keys + cols[None, :],
                             mask=in_group[:, None] & inside[None, :], other=float("-inf"))  # fmt: skip
            mass = tl.sum(tl.exp(scores - safe[:, None]) / total[:, None], 0)
            target = MASS + batch * smb + kv_head * smh + cols * sms
            if ADD_MASS:
                mass += tl.load(target, mask=inside, other=0.0)
            tl.store(target, mass, mask=inside)


def attend_decode(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor,
    column: torch.Tensor,
    sliding_window: int | None,
    scaling: float,
    with_mass: bool,
    add_mass_to: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One decode query per sequence over a buffer whose slots are in any order.

    ``query`` is ``[batch, q_heads, 1, dim]``; ``positions``/``valid`` (``[batch, 1 or kv_heads,
    slots]``) describe the slots, which must include the query's own token; ``column`` is a
    one-element tensor (read on the device, so a captured step stays correct on replay), used only
    for a sliding window. Returns the output and, if ``with_mass``, the mass ``[batch, kv_heads,
    slots]`` (each key's probability summed over the query heads sharing it), unless
    ``add_mass_to`` (running scores of that shape) is given: the mass is then added to it in place.
    """
    batch, q_heads, _, dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    group = q_heads // kv_heads
    members = triton.next_power_of_2(group)
    splits = math.ceil(keys / DECODE_CHUNK)
    floats = dict(dtype=torch.float32, device=query.device)
    part_max = torch.empty(batch * q_heads * splits, **floats)
    part_sum = torch.empty(batch * q_heads * splits, **floats)
    part_acc = torch.empty(batch * q_heads * splits, dim, **floats)
    scores = torch.empty(batch, q_heads, keys, **floats) if with_mass else part_max
    mass = None
    if with_mass:
        mass = add_mass_to if add_mass_to is not None else torch.empty(batch, kv_heads, keys, **floats)
    output = torch.empty_like(query)
    valid = valid.view(torch.int8) if valid.dtype == torch.bool else valid
    _decode_chunk[(splits, batch * kv_heads)](
        query, key, value, positions, valid, column, scores, part_max, part_sum, part_acc,
        query.stride(0), query.stride(1), query.stride(3),
        *key.stride(), *value.stride(), *positions.stride(),
        keys, q_heads, kv_heads, splits, sliding_window or 0, scaling,
        HAS_WINDOW=sliding_window is not None, WITH_MASS=with_mass, POSITION_HEADS=positions.shape[1],
        DIM=dim, GROUP=group, GM=max(16, members), CHUNK=DECODE_CHUNK, BN=DECODE_BLOCK,
        IEEE=query.dtype == torch.float32, num_warps=DECODE_WARPS,
    )  # fmt: skip
    blocks = math.ceil(keys / DECODE_MASS_BLOCK) if with_mass else 1
    _decode_combine[(blocks, batch * kv_heads)](
        scores, part_max, part_sum, part_acc, output, mass if with_mass else part_max,
        output.stride(0), output.stride(1), output.stride(3), *(mass.stride() if with_mass else (0, 0, 0)),
        keys, q_heads, kv_heads, splits,
        WITH_MASS=with_mass, ADD_MASS=add_mass_to is not None, DIM=dim, GROUP=group, GP=members,
        SP=triton.next_power_of_2(splits), BN=DECODE_MASS_BLOCK,
        num_warps=DECODE_MASS_WARPS if with_mass else 4,
    )  # fmt: skip
    return output, (mass if add_mass_to is None else None)


if triton is not None:

    @triton.jit
    def _evict_lowest(
        PRIORITY, VALID, POSITIONS, BUDGET, FREE, COLUMN, NEWEST, slots, heads,
        spb, sph, sps, svb, svh, svs, sqb, sqh, sqs,
        BS: tl.constexpr, BLOCKS: tl.constexpr, HAS_NEWEST: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0)
        batch, head = row // heads, row % heads
        none = 2**62
        if HAS_NEWEST:
            kept_after = tl.load(COLUMN) - tl.load(NEWEST + batch)
        lowest = tl.full((), float("inf"), tl.float32)
        oldest = tl.full((), none, tl.int64)
        victim = tl.full((), 0, tl.int64)
        held = tl.zeros((), tl.int64)
        first_empty = tl.full((), none, tl.int64)
        for block in range(0, BLOCKS):
            cols = (block * BS + tl.arange(0, BS)).to(tl.int64)
            inside = cols < slots
            valid = tl.load(VALID + batch * svb + head * svh + cols * svs, mask=inside, other=0) != 0
            priority = tl.load(
                PRIORITY + batch * spb + head * sph + cols * sps, mask=valid, other=float("inf")
            )
            positions = tl.load(POSITIONS + batch * sqb + head * sqh + cols * sqs, mask=valid, other=none)
            priority = priority.to(tl.float32)
            if HAS_NEWEST:
                priority = tl.where(positions > kept_after, float("inf"), priority)
            block_lowest = tl.min(priority, 0)
            tied = valid & (priority == block_lowest)
            block_oldest = tl.min(tl.where(tied, positions, none), 0)
            block_victim = tl.min(tl.where(tied & (positions == block_oldest), cols, none), 0)
            better = (block_lowest < lowest) | ((block_lowest == lowest) & (block_oldest < oldest))
            lowest = tl.where(better, block_lowest, lowest)
            oldest = tl.where(better, block_oldest, oldest)
            victim = tl.where(better, block_victim, victim)
            held += tl.sum(valid.to(tl.int64), 0)
            first_empty = tl.minimum(first_empty, tl.min(tl.where(inside & ~valid, cols, none), 0))
        if held > tl.load(BUDGET + batch):
            tl.store(VALID + batch * svb + head * svh + victim * svs, 0)
            first_empty = tl.minimum(first_empty, victim)
        tl.store(FREE + row, tl.where(first_empty == none, 0, first_empty))


EVICT_BLOCK = 1024


def evict_lowest(
    priority: torch.Tensor,
    valid: torch.Tensor,
    positions: torch.Tensor,
    budget: torch.Tensor,
    free: torch.Tensor,
    column: torch.Tensor | None = None,
    newest: torch.Tensor | None = None,
) -> None:
    """In place, per row of ``[batch, heads, slots]``: if more slots are valid than the sequence's
    ``budget`` (``[batch]``), invalidates the valid slot of lowest ``priority`` (ties: smallest
    position); then sets ``free`` (``[batch, heads]``, contiguous) to the first invalid slot (0 if
    none). ``priority`` and ``positions`` may have one head for all. With ``newest`` (``[batch]``),
    tokens at positions above ``column`` (one element) minus ``newest`` rank as ``KEEP``.
    """
    batch, heads, slots = valid.shape
    priority, positions = priority.expand_as(valid), positions.expand_as(valid)
    flags = valid.view(torch.int8)
    _evict_lowest[(batch * heads,)](
        priority, flags, positions, budget, free, column, newest, slots, heads,
        *priority.stride(), *flags.stride(), *positions.stride(),
        BS=EVICT_BLOCK, BLOCKS=triton.next_power_of_2(math.ceil(slots / EVICT_BLOCK)),
        HAS_NEWEST=newest is not None,
    )  # fmt: skip


if triton is not None:

    @triton.jit
    def _residual_cosine(R, A, OUT, width, srr, srd, sar, sad, BD: tl.constexpr, BLOCKS: tl.constexpr):
        row = tl.program_id(0)
        rr = tl.zeros([BD], tl.float32)
        yy = tl.zeros([BD], tl.float32)
        ry = tl.zeros([BD], tl.float32)
        for block in range(0, BLOCKS):
            dims = block * BD + tl.arange(0, BD)
            inside = dims < width
            r = tl.load(R + row * srr + dims * srd, mask=inside, other=0.0).to(tl.float32)
            y = r + tl.load(A + row * sar + dims * sad, mask=inside, other=0.0).to(tl.float32)
            rr += r * r
            yy += y * y
            ry += r * y
        eps = 1e-8
        norms = tl.maximum(tl.sqrt(tl.sum(rr, 0)), eps) * tl.maximum(tl.sqrt(tl.sum(yy, 0)), eps)
        tl.store(OUT + row, tl.sum(ry, 0) / norms)


COSINE_BLOCK = 1024


def residual_cosine(residual: torch.Tensor, attention_output: torch.Tensor) -> torch.Tensor:
    """``[..., tokens]`` float32 cos(residual, residual + attention_output) over the last dimension,
    as ``torch.nn.functional.cosine_similarity`` computes it in float32 (eps 1e-8 on each norm)."""
    width = residual.shape[-1]
    rows_r, rows_a = residual.reshape(-1, width), attention_output.reshape(-1, width)
    cosine = torch.empty(rows_r.shape[0], dtype=torch.float32, device=residual.device)
    _residual_cosine[(rows_r.shape[0],)](
        rows_r, rows_a, cosine, width, *rows_r.stride(), *rows_a.stride(),
        BD=COSINE_BLOCK, BLOCKS=triton.next_power_of_2(math.ceil(width / COSINE_BLOCK)),
    )  # fmt: skip
    return cosine.view(residual.shape[:-1])


if triton is not None:

    @triton.jit
    def _write_slot(
        KEY, VALUE, KEYS, VALUES, POSITIONS, VALID, SCORES, FREE, COLUMN,
        skb, skh, skd, svb, svh, svd,
        sKb, sKh, sKn, sKd, sVb, sVh, sVn, sVd,
        spb, sph, sps, sab, sah, sas, ssb, ssh, sss,
        kv_heads, heads,
        DIM: tl.constexpr, VALUE_DIM: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0)
        batch, kv_head = row // kv_heads, row % kv_heads
        head = kv_head if heads > 1 else 0
        slot = tl.load(FREE + batch * heads + head)
        dims = tl.arange(0, DIM)
        key = tl.load(KEY + batch * skb + kv_head * skh + dims * skd)
        tl.store(KEYS + batch * sKb + kv_head * sKh + slot * sKn + dims * sKd, key)
        dims = tl.arange(0, VALUE_DIM)
        value = tl.load(VALUE + batch * svb + kv_head * svh + dims * svd)
        tl.store(VALUES + batch * sVb + kv_head * sVh + slot * sVn + dims * sVd, value)
        if kv_head < heads:  # one program per bookkeeping row
            tl.store(POSITIONS + batch * spb + head * sph + slot * sps, tl.load(COLUMN))
            tl.store(VALID + batch * sab + head * sah + slot * sas, 1)
            tl.store(SCORES + batch * ssb + head * ssh + slot * sss, 0.0)


def write_slot(
    key: torch.Tensor,
    value: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor,
    scores: torch.Tensor,
    free: torch.Tensor,
    column: torch.Tensor,
) -> None:
    """Writes one new token per sequence (``key``/``value``: ``[batch, kv_heads, 1, dim]``) into slot
    ``free`` (``[batch, 1 or kv_heads]``, contiguous) of the buffers, with position ``column``
    (a one-element tensor), valid and score 0."""
    batch, kv_heads = keys.shape[:2]
    flags = valid.view(torch.int8)
    _write_slot[(batch * kv_heads,)](
        key, value, keys, values, positions, flags, scores, free, column,
        key.stride(0), key.stride(1), key.stride(3), value.stride(0), value.stride(1), value.stride(3),
        *keys.stride(), *values.stride(), *positions.stride(), *flags.stride(), *scores.stride(),
        kv_heads, positions.shape[1], DIM=keys.shape[-1], VALUE_DIM=values.shape[-1],
    )  # fmt: skip
