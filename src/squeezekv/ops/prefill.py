"""Attention of a forward's queries over a layer's cached tokens, with each key's attention mass.

H2O and SnapKV need, at prefill, how much attention every key receives. The torch twin
(:func:`squeezekv.ops.attention.attend`) materialises the probabilities in query chunks, which costs
several passes over a ``queries x keys`` matrix. The Triton pair keeps that matrix on chip; a
key's mass needs every scoring row's final log-sum-exp, so the scores are computed twice:

1. a flash-attention forward (a program per block of rows) writes the output and each row's
   log-sum-exp; a plainly causal layer (a fresh prompt without padding) takes cuDNN's forward
   instead, which returns the log-sum-exp too (:func:`cudnn_causal`);
2. a program per block of keys and query head recomputes the scored rows' scores against them (the
   keys stay in registers while blocks of rows stream past), normalises them with the stored
   log-sum-exp and sums them over rows: no atomics; the query heads sharing a key head are summed
   afterwards (one small reduction). With a program per key head looping over its query heads
   instead, a Mistral-7B layer's mass pass took 0.92 ms against 0.70 (Qwen2.5-7B 0.81 against
   0.66; the H200, 8k queries): fewer, longer programs fill the GPU worse.

On the H200 (Llama-2-7B layer, 8k queries, bf16) this took 2.31 ms against 2.98 ms for the other
known order (a pass writing only each row's log-sum-exp, then one pass computing the output from
normalised probabilities and adding the same tile's column sums to each key's mass atomically),
whose column sums cost a reduction across the warps of every tile.

Both kernels use the layer's own visibility rule (real tokens, causal by column, optional sliding
window). The new tokens are the last keys and keys are kept in column order, so a query sees no
key after its own index, and every key before a block's first query is causally visible to all
its rows: only the blocks along the diagonal (or all, with a window) build the full mask.
"""

from __future__ import annotations

import math

import torch

from squeezekv.ops.attention import attend, fused, layer_mask
from squeezekv.ops.common import dot, tl, triton

# (rows, keys, warps, stages) per program, best first (the first ones measured fastest on the H200
# for 128-dim bf16 heads: the mass pass over 8k queries took 0.69 ms with 128 rows by 64 keys, 0.79
# with 64 by 128; 0.83 against 1.07 ms with 4 query heads per key head); the first whose tiles fit
# SHARED_BYTES serves
ROW_CONFIGS = ((64, 64, 4, 3), (64, 64, 4, 2), (64, 32, 4, 1))
MASS_CONFIGS = ((128, 64, 4, 3), (128, 64, 4, 2), (64, 64, 4, 2), (32, 64, 4, 1))
SHARED_BYTES = 160 * 1024
LOG2E = 1.4426950408889634

if triton is not None:
    MASKED = tl.constexpr(-1.0e30)  # finite: a row masked so far still meets its own key, whose
    # maximum then rescales what the masked entries added to zero (no inf - inf)

    @triton.jit
    def _visible(positions, valid, columns, window, HAS_WINDOW: tl.constexpr):
        """Whether a query at ``columns`` sees a key at ``positions`` (shapes broadcast)."""
        seen = (valid != 0) & (positions <= columns)
        if HAS_WINDOW:
            seen = seen & (positions > columns - window)
        return seen | (positions == columns)

    @triton.jit
    def _row_step(
        q, acc, best, total, K, V, P, A, start, k_base, v_base, p_base,
        skn, skd, svn, svd, spn, keys, columns, window, qk_scale,
        HAS_WINDOW: tl.constexpr, DIAGONAL: tl.constexpr, DIM: tl.constexpr, BN: tl.constexpr,
        IEEE: tl.constexpr,
    ):  # fmt: skip
        """One block of keys for a block of rows, online softmax in log2 units."""
        cols = start + tl.arange(0, BN)
        inside = cols < keys
        dims = tl.arange(0, DIM)
        k = tl.load(K + k_base + cols[:, None] * skn + dims[None, :] * skd, mask=inside[:, None], other=0.0)
        valid = tl.load(A + p_base + cols * spn, mask=inside, other=0)
        scores = dot(q, tl.trans(k), IEEE) * qk_scale
        if DIAGONAL | HAS_WINDOW:
            positions = tl.load(P + p_base + cols * spn, mask=inside, other=0)
            seen = _visible(positions[None, :], valid[None, :], columns[:, None], window, HAS_WINDOW)
            scores = tl.where(seen & inside[None, :], scores, MASKED)
        else:
            scores = tl.where(valid[None, :] != 0, scores, MASKED)
        new_best = tl.maximum(best, tl.max(scores, 1))
        p = tl.exp2(scores - new_best[:, None])
        rescale = tl.exp2(best - new_best)
        v = tl.load(V + v_base + cols[:, None] * svn + dims[None, :] * svd, mask=inside[:, None], other=0.0)
        acc = acc * rescale[:, None] + dot(p.to(v.dtype), v, IEEE)
        return acc, new_best, total * rescale + tl.sum(p, 1)

    @triton.jit
    def _rows(
        Q, K, V, P, A, OUT, LSE,
        sqb, sqh, sqm, sqd,
        skb, skh, skn, skd,
        svb, svh, svn, svd,
        spb, sph, spn,
        sob, soh, som, sod,
        queries, keys, q_heads, group, first_column, window, qk_scale,
        HAS_WINDOW: tl.constexpr, POSITION_HEADS: tl.constexpr, DIM: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        """A block of rows over the keys they may see: the output and each row's log-sum-exp."""
        block = tl.num_programs(0) - 1 - tl.program_id(0)  # the longest rows first
        batch_head = tl.program_id(1)
        batch, head = batch_head // q_heads, batch_head % q_heads
        kv_head = head // group
        position_head = kv_head if POSITION_HEADS > 1 else 0
        rows = block * BM + tl.arange(0, BM)
        in_rows = rows < queries
        dims = tl.arange(0, DIM)
        q = tl.load(Q + batch * sqb + head * sqh + rows[:, None] * sqm + dims[None, :] * sqd,
                    mask=in_rows[:, None], other=0.0)  # fmt: skip
        columns = first_column + rows
        acc = tl.zeros([BM, DIM], tl.float32)
        best = tl.full([BM], MASKED, tl.float32)
        total = tl.zeros([BM], tl.float32)
        k_base, v_base = batch * skb + kv_head * skh, batch * svb + kv_head * svh
        p_base = batch * spb + position_head * sph
        diagonal = keys - queries + block * BM  # every earlier key comes before each row's own
        split = diagonal // BN * BN
        for start in range(0, split, BN):
            acc, best, total = _row_step(
                q, acc, best, total, K, V, P, A, start, k_base, v_base, p_base,
                skn, skd, svn, svd, spn, keys, columns, window, qk_scale, HAS_WINDOW, False, DIM, BN, IEEE,
            )  # fmt: skip
        for start in range(split, tl.minimum(keys, diagonal + BM), BN):
            acc, best, total = _row_step(
                q, acc, best, total, K, V, P, A, start, k_base, v_base, p_base,
                skn, skd, svn, svd, spn, keys, columns, window, qk_scale, HAS_WINDOW, True, DIM, BN, IEEE,
            )  # fmt: skip
        tl.store(OUT + batch * sob + head * soh + rows[:, None] * som + dims[None, :] * sod,
                 (acc / total[:, None]).to(OUT.dtype.element_ty), mask=in_rows[:, None])  # fmt: skip
        tl.store(LSE + batch_head * queries + rows, best + tl.log2(total), mask=in_rows)

    @triton.jit
    def _mass_step(
        acc, k, positions, valid, inside, Q, SHIFT, start, q_base, shift_base,
        sqm, sqd, queries, first_column, window, qk_scale,
        HAS_WINDOW: tl.constexpr, DIAGONAL: tl.constexpr, DIM: tl.constexpr, BM: tl.constexpr,
        IEEE: tl.constexpr, PEAK: tl.constexpr,
    ):  # fmt: skip
        """A block of scored rows' weighted probabilities added (or, ``PEAK``, maximised) into a
        ``[keys, rows]`` accumulator, reduced over rows once at the end."""
        rows = start + tl.arange(0, BM)
        in_rows = rows < queries
        dims = tl.arange(0, DIM)
        q = tl.load(Q + q_base + rows[:, None] * sqm + dims[None, :] * sqd, mask=in_rows[:, None], other=0.0)
        shift = tl.load(SHIFT + shift_base + rows, mask=in_rows, other=float("inf"))
        logits = dot(k, tl.trans(q), IEEE) * qk_scale - shift[None, :]  # keys are the tile's rows
        if DIAGONAL | HAS_WINDOW:
            seen = _visible(
                positions[:, None], valid[:, None], first_column + rows[None, :], window, HAS_WINDOW
            )
            logits = tl.where(seen & inside[:, None], logits, float("-inf"))
        probs = tl.exp2(logits)
        if PEAK:
            return tl.maximum(acc, probs)
        return acc + probs

    @triton.jit
    def _key_mass(
        Q, K, P, A, SHIFT, M,
        sqb, sqh, sqm, sqd,
        skb, skh, skn, skd,
        spb, sph, spn,
        queries, keys, q_heads, group, first_column, first_scored, window, qk_scale,
        HAS_WINDOW: tl.constexpr, POSITION_HEADS: tl.constexpr, DIM: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr, PEAK: tl.constexpr,
    ):  # fmt: skip
        """A block of keys' mass over one query head's scored rows (the heads sharing a key head
        are summed afterwards).

        ``SHIFT`` is each row's log-sum-exp minus the log of its weight (``inf`` for a row that is
        not scored), so a weighted probability is one ``exp2``. Off the diagonal every row sees
        every real key, so those blocks mask nothing: a padding key's own sum is dropped at the end.
        """
        block, batch_head = tl.program_id(0), tl.program_id(1)
        batch, head = batch_head // q_heads, batch_head % q_heads
        kv_head = head // group
        position_head = kv_head if POSITION_HEADS > 1 else 0
        cols = block * BN + tl.arange(0, BN)
        inside = cols < keys
        dims = tl.arange(0, DIM)
        k = tl.load(K + batch * skb + kv_head * skh + cols[:, None] * skn + dims[None, :] * skd,
                    mask=inside[:, None], other=0.0)  # fmt: skip
        base = batch * spb + position_head * sph + cols * spn
        positions = tl.load(P + base, mask=inside, other=0)
        valid = tl.load(A + base, mask=inside, other=0)
        acc = tl.zeros([BN, BM], tl.float32)
        offset = keys - queries
        first = tl.maximum(first_scored, block * BN - offset) // BM * BM  # earlier rows see none
        causal = tl.maximum(first, (block * BN + BN - offset + BM - 1) // BM * BM)  # later ones see all
        q_base, shift_base = batch * sqb + head * sqh, batch_head * queries
        for start in range(first, causal, BM):
            acc = _mass_step(
                acc, k, positions, valid, inside, Q, SHIFT, start, q_base, shift_base,
                sqm, sqd, queries, first_column, window, qk_scale, HAS_WINDOW, True, DIM, BM, IEEE, PEAK,
            )  # fmt: skip
        for start in range(causal, queries, BM):
            acc = _mass_step(
                acc, k, positions, valid, inside, Q, SHIFT, start, q_base, shift_base,
                sqm, sqd, queries, first_column, window, qk_scale, HAS_WINDOW, False, DIM, BM, IEEE, PEAK,
            )  # fmt: skip
        mass = tl.max(acc, 1) if PEAK else tl.sum(acc, 1)
        tl.store(M + batch_head * keys + cols, tl.where(valid != 0, mass, 0.0), mask=inside)


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
    peak: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Output ``[batch, q_heads, queries, dim]`` and, when ``scored > 0``, the mass ``[batch,
    kv_heads, keys]`` the last ``scored`` real queries gave each key (with ``peak``: the largest
    probability any of them gave it, instead of the sum).

    ``positions``/``valid`` (``[batch, 1 or kv_heads, keys]``) describe the cached keys, whose last
    ``queries`` are the new tokens at columns ``first_column, first_column + 1, ...``;
    ``query_valid`` (``[batch, queries]``) says which queries are real. The Triton kernels serve a
    scoring forward of several queries (see :func:`squeezekv.ops.attention.fused`); ``softcap``,
    ``explicit`` and ``plainly_causal`` (no padding, no window: SDPA's causal kernels) concern the
    torch twin.
    """
    if scored and query.shape[2] > 1 and fused(query, softcap, explicit):
        return prefill_attention_triton(
            query, key, value, positions, valid, first_column, sliding_window, scaling, scored, query_valid,
            plainly_causal=plainly_causal, peak=peak,
        )  # fmt: skip
    return prefill_attention_torch(
        query, key, value, positions, valid, first_column, sliding_window, scaling, scored, query_valid,
        softcap, explicit, plainly_causal, peak=peak,
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
    *,
    peak: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The torch twin of :func:`prefill_attention_triton` (same arguments, same result)."""
    queries = query.shape[2]
    mask = None
    if not (plainly_causal and sliding_window is None and key.shape[2] == queries):
        columns = torch.arange(first_column, first_column + queries, device=query.device)
        mask = layer_mask(positions, valid, columns, sliding_window)
    return attend(
        query, key, value, mask, scaling, scored, query_valid, softcap, explicit=explicit, peak=peak
    )


def fitting(configs: tuple, rows_resident: bool, dim: int, element_size: int) -> dict:
    """The first of ``configs`` whose tiles fit ``SHARED_BYTES`` (a head of ``dim`` elements): the
    resident block plus ``stages`` copies of the streamed one (keys and values for the row kernel)."""
    row_bytes = dim * element_size
    for block_m, block_n, warps, stages in configs:
        resident, streamed = (block_m, 2 * block_n) if rows_resident else (block_n, block_m)
        if row_bytes * (resident + stages * streamed) <= SHARED_BYTES:
            return dict(BM=block_m, BN=block_n, num_warps=warps, num_stages=stages)
    raise ValueError(f"a head of {dim} elements of {element_size} bytes fits no prefill kernel's tiles")


def cudnn_causal(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """cuDNN's causal attention with each row's log-sum-exp (``[batch, q_heads, queries]``, log2
    units); ``None`` where cuDNN cannot serve the layer. On the H200 (Llama-2-7B layer, 8k queries,
    bf16) it took 0.91 ms against 1.47 ms for ``_rows``, 0.97 ms for SDPA's causal forward (which
    picks it there) and 1.75 ms for the flash kernel."""
    group = query.shape[1] != key.shape[1]
    params = torch.backends.cuda.SDPAParams(query, key, value, None, 0.0, True, group)
    if not (query.is_cuda and torch.backends.cuda.can_use_cudnn_attention(params)):
        return None
    output, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
        query, key, value, None, True, 0.0, True, False, scale=scaling
    )[:2]
    return output, lse.reshape(query.shape[:3]) * LOG2E


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
    *,
    plainly_causal: bool = False,
    peak: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The Triton pair behind :func:`prefill_attention` (``scored`` > 0). A plainly causal layer
    (``plainly_causal``, no window, the queries are all the keys) takes its output and log-sum-exp
    from :func:`cudnn_causal` where cuDNN serves it, instead of from ``_rows``."""
    batch, q_heads, queries, dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    group = q_heads // kv_heads
    first_scored = queries - scored
    positions = positions.contiguous()
    valid = valid.to(torch.int8).contiguous()
    shape = dict(
        HAS_WINDOW=sliding_window is not None, POSITION_HEADS=positions.shape[1], DIM=dim,
        IEEE=query.dtype == torch.float32,
    )  # fmt: skip
    window = sliding_window if sliding_window is not None else 0
    qk_scale = scaling * LOG2E
    forward = None
    if plainly_causal and sliding_window is None and keys == queries:
        forward = cudnn_causal(query, key, value, scaling)
    if forward is None:
        output = torch.empty_like(query)
        lse = torch.empty(batch, q_heads, queries, dtype=torch.float32, device=query.device)
        rows_config = fitting(ROW_CONFIGS, True, dim, query.element_size())
        _rows[(math.ceil(queries / rows_config["BM"]), batch * q_heads)](
            query, key, value, positions, valid, output, lse,
            *query.stride(), *key.stride(), *value.stride(), *positions.stride(), *output.stride(),
            queries, keys, q_heads, group, first_column, window, qk_scale, **shape, **rows_config,
        )  # fmt: skip
        forward = output, lse
    output, lse = forward
    weight = torch.zeros(batch, queries, dtype=torch.float32, device=query.device)
    weight[:, first_scored:] = query_valid[:, first_scored:].to(weight.device, torch.float32)
    shift = (lse - weight.log2().unsqueeze(1)).contiguous()  # a weighted probability is one exp2
    mass = torch.empty(batch, kv_heads, group, keys, dtype=torch.float32, device=query.device)
    mass_config = fitting(MASS_CONFIGS, False, dim, query.element_size())
    _key_mass[(math.ceil(keys / mass_config["BN"]), batch * q_heads)](
        query, key, positions, valid, shift, mass,
        *query.stride(), *key.stride(), *positions.stride(),
        queries, keys, q_heads, group, first_column, first_scored, window, qk_scale,
        **shape, **mass_config, PEAK=peak,
    )  # fmt: skip
    if group == 1:
        return output, mass.squeeze(2)
    return output, mass.amax(2) if peak else mass.sum(2)
