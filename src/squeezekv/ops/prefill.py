"""Attention of a forward's queries over a layer's cached tokens, with each key's attention mass.

H2O and SnapKV need, at prefill, how much attention every key receives. The torch twin
(:func:`squeezekv.ops.attention.attend`) materialises the probabilities in query chunks, which costs
several passes over a ``queries x keys`` matrix. The Triton pair keeps that matrix on chip:

1. a flash-attention forward over the layer's keys, with the layer's own visibility rule (real
   tokens, causal by column, optional sliding window), writing the output and each row's
   log-sum-exp;
2. a pass per block of keys that recomputes the scores of the scored queries, normalises them with
   the stored log-sum-exp and sums them over queries and over the query heads sharing the key head.

The new tokens are the last keys and keys are kept in column order, so a query sees no key after
its own index; blocks past that are skipped.
"""

from __future__ import annotations

import math

import torch

from squeezekv.ops.attention import attend, fused, layer_mask
from squeezekv.ops.common import dot, tl, triton

BLOCK_M = 64
BLOCK_N = 64

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
            scores = dot(q, tl.trans(k), IEEE) * scale
            seen = _visible(positions, valid, columns, window, HAS_WINDOW) & inside[None, :]
            scores = tl.where(seen, scores, float("-inf"))
            new_best = tl.maximum(best, tl.max(scores, 1))
            safe = tl.where(new_best == float("-inf"), 0.0, new_best)
            p = tl.exp(scores - safe[:, None])
            rescale = tl.exp(best - safe)
            total = total * rescale + tl.sum(p, 1)
            acc = acc * rescale[:, None] + dot(p.to(v.dtype), v, IEEE)
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
                scores = dot(q, tl.trans(k), IEEE) * scale
                seen = _visible(positions, valid, first_column + rows, window, HAS_WINDOW) & inside[None, :]
                p = tl.where(seen, tl.exp(scores - lse[:, None]), 0.0)
                mass += tl.sum(p * weight[:, None], 0)
        tl.store(M + batch_head * keys + cols, mass, mask=inside)


def prefill_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor,
    first_column: int,
    sliding_window: int | None,
    scaling: float,
    scored: int,
    query_valid: torch.Tensor,
    softcap: float | None = None,
    explicit: bool = False,
    plainly_causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Output ``[batch, q_heads, queries, dim]`` and, when ``scored > 0``, the mass ``[batch,
    kv_heads, keys]`` the last ``scored`` real queries gave each key.

    ``positions``/``valid`` (``[batch, 1 or kv_heads, keys]``) describe the cached keys, whose last
    ``queries`` are the new tokens at columns ``first_column, first_column + 1, ...``;
    ``query_valid`` (``[batch, queries]``) says which queries are real. The Triton pair serves a
    scoring forward of several queries (see :func:`squeezekv.ops.attention.fused`); ``softcap``,
    ``explicit`` and ``plainly_causal`` (no padding, no window: SDPA's causal kernels) concern the
    torch twin.
    """
    if scored and query.shape[2] > 1 and fused(query, softcap, explicit):
        return prefill_attention_triton(
            query, key, value, positions, valid, first_column, sliding_window, scaling, scored, query_valid
        )
    return prefill_attention_torch(
        query, key, value, positions, valid, first_column, sliding_window, scaling, scored, query_valid,
        softcap, explicit, plainly_causal,
    )  # fmt: skip


def prefill_attention_torch(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor,
    first_column: int,
    sliding_window: int | None,
    scaling: float,
    scored: int,
    query_valid: torch.Tensor,
    softcap: float | None = None,
    explicit: bool = False,
    plainly_causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The torch twin of :func:`prefill_attention_triton` (same arguments, same result)."""
    queries = query.shape[2]
    mask = None
    if not (plainly_causal and sliding_window is None and key.shape[2] == queries):
        columns = torch.arange(first_column, first_column + queries, device=query.device)
        mask = layer_mask(positions, valid, columns, sliding_window)
    return attend(query, key, value, mask, scaling, scored, query_valid, softcap, explicit=explicit)


def prefill_attention_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor,
    first_column: int,
    sliding_window: int | None,
    scaling: float,
    scored: int,
    query_valid: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The Triton pair behind :func:`prefill_attention`."""
    batch, q_heads, queries, dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    group = q_heads // kv_heads
    positions = positions.contiguous()
    valid = valid.to(torch.int8).contiguous()
    weight = torch.zeros(batch, queries, dtype=torch.float32, device=query.device)
    weight[:, queries - scored :] = query_valid[:, queries - scored :].to(weight.device, torch.float32)
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
    return output, (mass if scored else None)
