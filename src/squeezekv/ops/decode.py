"""One decode query per sequence over the fast engine's buffer, whose slots are in no order, with
each key's attention mass.

The Triton pair is split over the keys as flash-decoding is, so that short batches still fill the
GPU:

1. each program takes one key head, the query heads sharing it (as the rows of a matrix product,
   padded to 16) and one chunk of slots; it writes the chunk's partial softmax state and, when the
   mass is wanted, the raw scores;
2. a pass per block of slots combines the chunks' states into each head's normaliser, turns the
   stored scores into probabilities summed over the group, and (first block only) the output.

A buffer whose heads keep different numbers of tokens (a head-wise policy) is packed: one
``[tokens, dim]`` tensor per layer, each (sequence, key head) a segment of it (:class:`Segments`).
The same kernels read it, each program its segment's own length.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from squeezekv.ops.attention import attend, fused
from squeezekv.ops.common import dot, tl, triton

DECODE_CHUNK = 512  # slots per decode program
DECODE_BLOCK = 64  # slots per step of a decode program's loop
DECODE_WARPS = 4
# The decode combine's attention-mass part: a program takes DECODE_MASS_BLOCK slots of
# DECODE_MASS_ROWS query heads where each key head serves one, and twice the slots of one group
# where it serves several, on a warp per row (up to 8). H200 sweeps, docs/performance.md "2026-12-02
# (issue 14)" and "Later on 2026-12-02": Mistral-7B went from 6.9 to 4.9 µs a layer, Qwen2.5-7B from
# 5.1 to 3.1; Llama-2-7B's from 13.8 to 7.2 with four rows instead of one and the mass loads issued
# before the normaliser's.
DECODE_MASS_BLOCK = 256
DECODE_MASS_ROWS = 4


class Segments(NamedTuple):
    """Where each (sequence, key head) of a packed buffer lies: ``offsets`` and ``lengths`` are
    ``[batch, kv_heads]`` slots (``lengths`` counts free slots too), ``width`` the largest length
    (a host integer, so that a padded view has static shapes)."""

    offsets: torch.Tensor
    lengths: torch.Tensor
    width: int

    def padded(self, packed: torch.Tensor, fill: float | bool = 0) -> torch.Tensor:
        """``packed`` (``[tokens, ...]``) as ``[batch, kv_heads, width, ...]``, slots past a
        segment's length filled with ``fill``: a transient copy of one layer."""
        places = torch.arange(self.width, device=packed.device)
        index = self.offsets.unsqueeze(-1) + places
        inside = places < self.lengths.unsqueeze(-1)
        gathered = packed[index.clamp(max=packed.shape[0] - 1)]
        return torch.where(inside.view(*inside.shape, *(1,) * (packed.dim() - 1)), gathered, fill)


if triton is not None:

    @triton.jit
    def _group_rows(Q, sqb, sqh, batch, kv_head, q_heads, GROUP: tl.constexpr, GM: tl.constexpr):
        """The query heads sharing ``kv_head`` as the rows of a matrix product (padded to ``GM``):
        which are real, their row indices, a ``[GM, 1]`` column of pointers to their queries, and an
        empty softmax state."""
        members = tl.arange(0, GM)
        in_group = members < GROUP
        rows = batch * q_heads + kv_head * GROUP + members
        queries = Q + batch * sqb + (kv_head * GROUP + members[:, None]) * sqh
        best = tl.full([GM], float("-inf"), tl.float32)
        total = tl.zeros([GM], tl.float32)
        return in_group, rows, queries, best, total

    @triton.jit
    def _group_query(
        Q, sqb, sqh, sqd, batch, kv_head, q_heads, GROUP: tl.constexpr, GM: tl.constexpr, DIM: tl.constexpr
    ):
        """:func:`_group_rows` with their queries loaded and an empty output: how every decode first
        pass over full-precision states starts."""
        in_group, rows, queries, best, total = _group_rows(Q, sqb, sqh, batch, kv_head, q_heads, GROUP, GM)
        dims = tl.arange(0, DIM)
        q = tl.load(queries + dims[None, :] * sqd, mask=in_group[:, None], other=0.0)
        return in_group, rows, dims, q, best, total, tl.zeros([GM, DIM], tl.float32)

    @triton.jit
    def _decode_chunk(
        Q, K, V, P, A, COLUMN, SCORES, PART_MAX, PART_SUM, PART_ACC, OFFSETS, LENGTHS,
        sqb, sqh, sqd,
        skb, skh, skn, skd,
        svb, svh, svn, svd,
        spb, sph, spn,
        keys, q_heads, kv_heads, splits, window, scale,
        HAS_WINDOW: tl.constexpr, WITH_MASS: tl.constexpr, POSITION_HEADS: tl.constexpr,
        DIM: tl.constexpr, GROUP: tl.constexpr, GM: tl.constexpr, CHUNK: tl.constexpr,
        BN: tl.constexpr, IEEE: tl.constexpr, PACKED: tl.constexpr,
    ):  # fmt: skip
        split, batch_head = tl.program_id(0), tl.program_id(1)
        if PACKED:  # this program's segment of the packed buffer (batch and head strides are 0)
            first = tl.load(OFFSETS + batch_head)
            held = tl.load(LENGTHS + batch_head)
        else:
            first = 0
            held = keys
        batch, kv_head = batch_head // kv_heads, batch_head % kv_heads
        position_head = kv_head if POSITION_HEADS > 1 else 0
        in_group, rows, dims, q, best, total, acc = _group_query(
            Q, sqb, sqh, sqd, batch, kv_head, q_heads, GROUP, GM, DIM
        )
        if HAS_WINDOW:
            oldest = tl.load(COLUMN) - window
        for offset in range(0, CHUNK, BN):
            cols = split * CHUNK + offset + tl.arange(0, BN)
            inside = cols < held
            slots = first + cols
            base = batch * spb + position_head * sph + slots * spn
            seen = tl.load(A + base, mask=inside, other=0) != 0
            if HAS_WINDOW:
                seen = seen & (tl.load(P + base, mask=inside, other=0) > oldest)
            k = tl.load(K + batch * skb + kv_head * skh + slots[:, None] * skn + dims[None, :] * skd,
                        mask=inside[:, None], other=0.0)  # fmt: skip
            scores = dot(q, tl.trans(k), IEEE) * scale
            scores = tl.where(seen[None, :], scores, float("-inf"))
            if WITH_MASS:
                tl.store(SCORES + rows[:, None] * keys + cols[None, :], scores,
                         mask=in_group[:, None] & inside[None, :])  # fmt: skip
            v = tl.load(V + batch * svb + kv_head * svh + slots[:, None] * svn + dims[None, :] * svd,
                        mask=inside[:, None], other=0.0)  # fmt: skip
            best, total, acc = _softmax_step(scores, v, best, total, acc, IEEE)
        _store_partials(
            PART_MAX, PART_SUM, PART_ACC, rows * splits + split, best, total, acc, in_group, dims, DIM
        )

    @triton.jit
    def _softmax_weights(scores, best, total):
        """One block of scores against the running softmax state: the new max and sum, the block's
        weights, and the factor that rescales what was weighted before."""
        new_best = tl.maximum(best, tl.max(scores, 1))
        safe = tl.where(new_best == float("-inf"), 0.0, new_best)
        p = tl.exp(scores - safe[:, None])
        rescale = tl.exp(best - safe)
        return new_best, total * rescale + tl.sum(p, 1), p, rescale

    @triton.jit
    def _softmax_step(scores, v, best, total, acc, IEEE: tl.constexpr):
        """One block of keys folded into the running softmax state (max, sum, weighted values)."""
        best, total, p, rescale = _softmax_weights(scores, best, total)
        return best, total, acc * rescale[:, None] + dot(p.to(v.dtype), v, IEEE)

    @triton.jit
    def _store_partials(
        PART_MAX, PART_SUM, PART_ACC, part, best, total, acc, in_group, dims, DIM: tl.constexpr
    ):
        """A split's softmax state, which :func:`_decode_combine` merges over the splits."""
        tl.store(PART_MAX + part, best, mask=in_group)
        tl.store(PART_SUM + part, total, mask=in_group)
        tl.store(PART_ACC + part[:, None] * DIM + dims[None, :], acc, mask=in_group[:, None])

    @triton.jit
    def _decode_combine(
        SCORES, PART_MAX, PART_SUM, PART_ACC, OUT, MASS,
        sob, soh, sod, smb, smh, sms,
        keys, q_rows, q_heads, kv_heads, splits,
        WITH_MASS: tl.constexpr, ADD_MASS: tl.constexpr, DIM: tl.constexpr, GROUP: tl.constexpr,
        OWNED: tl.constexpr, ROWS: tl.constexpr, SP: tl.constexpr, BN: tl.constexpr,
    ):  # fmt: skip
        """A program owns ``OWNED`` query rows (``ROWS`` >= that, a power of 2): a key head's group,
        whose probabilities it sums, or with one query head per key head, several heads apart."""
        block = tl.program_id(0)
        members = tl.arange(0, ROWS)
        rows = tl.program_id(1) * OWNED + members
        in_rows = (members < OWNED) & (rows < q_rows)
        if WITH_MASS:  # every load that needs no normaliser goes out first, so all are in flight together
            cols = block * BN + tl.arange(0, BN)
            inside = cols < keys
            scores = tl.load(SCORES + rows[:, None] * keys + cols[None, :],
                             mask=in_rows[:, None] & inside[None, :], other=float("-inf"))  # fmt: skip
            if GROUP == 1:  # each row its own key head
                row_base = rows // kv_heads * smb + rows % kv_heads * smh
                target = MASS + row_base[:, None] + cols[None, :] * sms
                writes = in_rows[:, None] & inside[None, :]
            else:
                kv_row = tl.program_id(1)
                target = MASS + kv_row // kv_heads * smb + kv_row % kv_heads * smh + cols * sms
                writes = inside
            if ADD_MASS:
                before = tl.load(target, mask=writes, other=0.0)
        chunks = tl.arange(0, SP)
        parts = rows[:, None] * splits + chunks[None, :]
        in_parts = in_rows[:, None] & (chunks[None, :] < splits)
        chunk_best = tl.load(PART_MAX + parts, mask=in_parts, other=float("-inf"))
        best = tl.max(chunk_best, 1)
        safe = tl.where(best == float("-inf"), 0.0, best)
        weights = tl.exp(chunk_best - safe[:, None])
        total = tl.sum(tl.load(PART_SUM + parts, mask=in_parts, other=0.0) * weights, 1)
        total = tl.where(in_rows, total, 1.0)  # a padding row: 0 / 1
        if block == 0:
            dims = tl.arange(0, DIM)
            acc = tl.zeros([ROWS, DIM], tl.float32)
            for chunk in range(0, SP):
                part = rows * splits + chunk
                present = in_rows & (members * 0 + chunk < splits)  # Triton 3.9 rejects a Python-bool mask
                weight = tl.exp(tl.load(PART_MAX + part, mask=present, other=float("-inf")) - safe)
                acc += weight[:, None] * tl.load(PART_ACC + part[:, None] * DIM + dims[None, :],
                                                 mask=present[:, None], other=0.0)  # fmt: skip
            out = acc / total[:, None]
            tl.store(OUT + (rows // q_heads * sob + rows % q_heads * soh)[:, None] + dims[None, :] * sod,
                     out.to(OUT.dtype.element_ty), mask=in_rows[:, None])  # fmt: skip
        if WITH_MASS:
            mass = tl.exp(scores - safe[:, None]) / total[:, None]
            if GROUP > 1:
                mass = tl.sum(mass, 0)
            if ADD_MASS:
                mass += before
            tl.store(target, mass, mask=writes)


def decode_attention(
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
    softcap: float | None = None,
    explicit: bool = False,
    segments: Segments | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One decode query per sequence over a buffer whose slots are in any order.

    ``query`` is ``[batch, q_heads, 1, dim]``; ``positions``/``valid`` (``[batch, 1 or kv_heads,
    slots]``) describe the slots, which must include the query's own token; ``column`` is a
    one-element tensor (read on the device, so a captured step stays correct on replay), used only
    for a sliding window. Returns the output and, if ``with_mass``, the mass ``[batch, kv_heads,
    slots]`` (each key's probability summed over the query heads sharing it), unless
    ``add_mass_to`` (running scores of that shape) is given: the mass is then added to it in place.
    With ``segments``, the buffer is packed: ``key``/``value`` are ``[tokens, dim]`` and
    ``positions``/``valid`` ``[tokens]``, each (sequence, key head) the segment ``segments`` names
    (no mass: no head-wise policy scores while decoding).
    The Triton pair serves it where :func:`squeezekv.ops.attention.fused` allows.
    """
    if segments is not None and with_mass:
        raise ValueError("decode_attention over a packed buffer gives no attention mass (with_mass=True)")
    if fused(query, softcap, explicit):
        return decode_attention_triton(
            query, key, value, positions, valid, column, sliding_window, scaling, with_mass, add_mass_to,
            segments,
        )  # fmt: skip
    return decode_attention_torch(
        query, key, value, positions, valid, column, sliding_window, scaling, with_mass, add_mass_to,
        softcap, explicit, segments,
    )  # fmt: skip


def decode_attention_torch(
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
    softcap: float | None = None,
    explicit: bool = False,
    segments: Segments | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The torch twin of :func:`decode_attention_triton` (same arguments, same result); a packed
    buffer is attended through a transient padded copy of the layer."""
    if segments is not None:
        key, value = segments.padded(key), segments.padded(value)
        positions, valid = segments.padded(positions), segments.padded(valid, False)
    mask = valid
    if sliding_window is not None:
        mask = mask & (positions > column - sliding_window)
    output, mass = attend(
        query, key, value, mask.unsqueeze(2), scaling, int(with_mass), None, softcap, explicit=explicit
    )
    if add_mass_to is not None and mass is not None:
        add_mass_to.add_(mass)
        return output, None
    return output, mass


def decode_attention_triton(
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
    segments: Segments | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The Triton pair behind :func:`decode_attention`."""
    batch, q_heads, _, dim = query.shape
    if segments is None:
        kv_heads, keys = key.shape[1], key.shape[2]
        key_strides, value_strides, position_strides = key.stride(), value.stride(), positions.stride()
        position_heads = positions.shape[1]
    else:  # each program finds its segment; the slot stride is the packed tensors' first
        kv_heads, keys = segments.offsets.shape[1], segments.width
        key_strides, value_strides = (0, 0, *key.stride()), (0, 0, *value.stride())
        position_strides, position_heads = (0, 0, positions.stride(0)), 1
    group = q_heads // kv_heads
    partials = DecodePartials.for_query(query, kv_heads, keys, with_mass, add_mass_to)
    splits, scores, part_max, part_sum, part_acc = partials[:5]
    valid = valid.view(torch.int8) if valid.dtype == torch.bool else valid
    offsets, lengths = (part_max, part_max) if segments is None else segments[:2]
    _decode_chunk[(splits, batch * kv_heads)](
        query, key, value, positions, valid, column, scores, part_max, part_sum, part_acc, offsets, lengths,
        query.stride(0), query.stride(1), query.stride(3),
        *key_strides, *value_strides, *position_strides,
        keys, q_heads, kv_heads, splits, sliding_window or 0, scaling,
        HAS_WINDOW=sliding_window is not None, WITH_MASS=with_mass, POSITION_HEADS=position_heads,
        DIM=dim, GROUP=group, GM=max(16, triton.next_power_of_2(group)), CHUNK=DECODE_CHUNK,
        BN=DECODE_BLOCK, IEEE=query.dtype == torch.float32, PACKED=segments is not None,
        num_warps=DECODE_WARPS,
    )  # fmt: skip
    return partials.combine(kv_heads, keys, add_mass_to)


class DecodePartials(NamedTuple):
    """The first decode pass's per-split softmax states (and, for the mass, each query head's
    scores), which :meth:`combine` turns into the output and the mass; shared by the contiguous
    and the paged first passes."""

    splits: int
    scores: torch.Tensor
    part_max: torch.Tensor
    part_sum: torch.Tensor
    part_acc: torch.Tensor
    output: torch.Tensor
    mass: torch.Tensor | None

    @classmethod
    def for_query(
        cls,
        query: torch.Tensor,
        kv_heads: int,
        keys: int,
        with_mass: bool,
        add_mass_to: torch.Tensor | None,
    ) -> DecodePartials:
        batch, q_heads, _, dim = query.shape
        splits = math.ceil(keys / DECODE_CHUNK)
        floats = dict(dtype=torch.float32, device=query.device)
        part_max = torch.empty(batch * q_heads * splits, **floats)
        part_sum = torch.empty(batch * q_heads * splits, **floats)
        part_acc = torch.empty(batch * q_heads * splits, dim, **floats)
        scores = torch.empty(batch, q_heads, keys, **floats) if with_mass else part_max
        mass = None
        if with_mass:
            mass = add_mass_to if add_mass_to is not None else torch.empty(batch, kv_heads, keys, **floats)
        return cls(splits, scores, part_max, part_sum, part_acc, torch.empty_like(query), mass)

    def combine(
        self, kv_heads: int, keys: int, add_mass_to: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The second pass: the output, and the mass (``None`` when it was added to ``add_mass_to``)."""
        output, mass = self.output, self.mass
        batch, q_heads, _, dim = output.shape
        group = q_heads // kv_heads
        with_mass = mass is not None
        owned = DECODE_MASS_ROWS if with_mass and group == 1 else group
        rows = triton.next_power_of_2(owned)
        block = DECODE_MASS_BLOCK if group == 1 else 2 * DECODE_MASS_BLOCK
        blocks = math.ceil(keys / block) if with_mass else 1
        _decode_combine[(blocks, math.ceil(batch * q_heads / owned))](
            self.scores, self.part_max, self.part_sum, self.part_acc, output,
            mass if with_mass else self.part_max, output.stride(0), output.stride(1), output.stride(3),
            *(mass.stride() if with_mass else (0, 0, 0)),
            keys, batch * q_heads, q_heads, kv_heads, self.splits,
            WITH_MASS=with_mass, ADD_MASS=add_mass_to is not None, DIM=dim, GROUP=group,
            OWNED=owned, ROWS=rows, SP=triton.next_power_of_2(self.splits), BN=block,
            num_warps=min(8, rows) if with_mass else 4,
        )  # fmt: skip
        return output, (mass if add_mass_to is None else None)
