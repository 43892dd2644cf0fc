"""One decode query per sequence over a quantized layer (:mod:`squeezekv.cache.quantized`) that
reads the packed codes themselves: no transient full-precision copy of the layer.

A layer's rows at one precision hold, per slot, packed key and value codes (:mod:`squeezekv.ops.quantize`:
keys per channel over a group of slots, values per token over groups of channels); its newest
columns wait unquantized in a residual window instead. The Triton first pass is
:mod:`~squeezekv.ops.decode`'s with each block of keys and values decoded in registers
(``code * scale + zero`` in float32, rounded to the query's dtype as the transient is) or, for a
slot in the residual window, read from it; the second pass, which turns the partial softmax states
into the output and the mass, is shared as it is. The torch twin dequantizes the layer as the
transient does and attends over it.

A slot is seen when it holds a token (inside the sliding window, if any) or is the query's own
column, as :func:`~squeezekv.ops.layer_mask` has it. On an H200 (Triton 3.6) the kernel matches its
torch twin (``tests/ops/test_quantized_decode.py``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from squeezekv.ops.attention import fused
from squeezekv.ops.common import dot, tl, triton
from squeezekv.ops.decode import (
    DECODE_CHUNK,
    DECODE_WARPS,
    DecodePartials,
    decode_attention_torch,
)
from squeezekv.ops.quantize import dequantize_keys, dequantize_values

PACKED_BLOCK = 16  # slots per step of a program's loop: on an H200 16 beat 32 and 64 (more registers a slot)


class PackedCodes(NamedTuple):
    """The slots of one precision's rows of a layer: ``[rows, heads, slots, ...]`` packed key and
    value codes (the states themselves at 16 bits), the key scales and zeros per group of slots
    (``[rows, heads, groups, dim]``) and each slot's group (``[rows, heads, slots]``), the value
    scales and zeros per slot (``[rows, heads, slots, dim / value_group]``); at 16 bits the scales,
    zeros and groups are unused."""

    bits: int
    key_codes: torch.Tensor
    key_scale: torch.Tensor
    key_zero: torch.Tensor
    key_group: torch.Tensor | None
    value_codes: torch.Tensor
    value_scale: torch.Tensor
    value_zero: torch.Tensor

    def states(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Every slot's keys and values decoded to ``dtype`` (keys 0 where there is no group yet)."""
        if self.bits == 16:
            return self.key_codes, self.value_codes
        if self.key_scale.shape[2] == 0:
            keys = torch.zeros(*self.key_codes.shape[:3], self.key_scale.shape[-1], dtype=dtype,
                               device=self.key_codes.device)  # fmt: skip
        else:
            keys = dequantize_keys(
                self.key_codes, self.key_scale, self.key_zero, self.key_group, self.bits, dtype
            )
        values = dequantize_values(self.value_codes, self.value_scale, self.value_zero, self.bits, dtype)
        return keys, values


def residual_laid_out(residual: torch.Tensor, columns: torch.Tensor, start: int) -> torch.Tensor:
    """The residual window's states (``[rows, heads, columns - start, dim]``, the window starting at
    column ``start``) laid out in the slots of ``columns`` (``[rows, heads, slots]``; slots outside
    the window get any of them)."""
    index = (columns - start).clamp(0, residual.shape[2] - 1)
    return residual.gather(2, index.unsqueeze(-1).expand(*index.shape, residual.shape[-1]))


def with_residual(
    states: torch.Tensor, residual: torch.Tensor, columns: torch.Tensor, start: int
) -> torch.Tensor:
    """``states`` with the slots of the residual window's columns read from ``residual``."""
    if residual.shape[2] == 0:
        return states
    inside = (columns >= start).unsqueeze(-1)
    return torch.where(inside, residual_laid_out(residual, columns, start), states)


if triton is not None:
    from squeezekv.ops.decode import (  # the contiguous pass's own steps
        _group_query,
        _softmax_step,
        _store_partials,
    )

    @triton.jit
    def _codes(CODES, base, seen, BITS: tl.constexpr, DIM: tl.constexpr):
        """``[slots, DIM]`` float32 codes of the slots whose packed bytes start at ``base`` (a
        ``[slots, 1]`` column), 0 where not ``seen``. At 8 bits one contiguous load per slot (vectorized);
        at 4 bits each channel reads its byte, the even channel's code in the low nibble (a join and
        reshape of the two nibbles instead gave wrong bfloat16 products on an H200, Triton 3.6)."""
        channels = tl.arange(0, DIM)[None, :]
        if BITS == 8:
            return tl.load(CODES + base + channels, mask=seen, other=0).to(tl.float32)
        packed = tl.load(CODES + base + channels // 2, mask=seen, other=0).to(tl.int32)
        return ((packed >> (channels % 2) * 4) & 15).to(tl.float32)

    @triton.jit
    def _states(STATES, base, slots, ssn, ssd, dims, mask):
        """``[BN, dims]`` states in the model's dtype of the ``slots`` (a ``[BN, 1]`` column) at
        ``base``, 0 where not ``mask``."""
        return tl.load(STATES + base + slots * ssn + dims[None, :] * ssd, mask=mask, other=0.0)

    @triton.jit
    def _quantized_decode_chunk(
        Q, K, KS, KZ, KG, V, VS, VZ, RK, RV, P, A, SCORES, PART_MAX, PART_SUM, PART_ACC,
        sqb, sqh, sqd,
        skb, skh, skn, skd, sksb, sksh, sksg, sgb, sgh, sgn,
        svb, svh, svn, svd, svsb, svsh, svsn,
        srkb, srkh, srkn, srkd, srvb, srvh, srvn, srvd,
        spb, sph, spn,
        keys, q_heads, kv_heads, splits, COLUMN, RESIDUAL_START, window, scale,
        HAS_WINDOW: tl.constexpr, WITH_MASS: tl.constexpr, POSITION_HEADS: tl.constexpr,
        DIM: tl.constexpr, GROUP: tl.constexpr, GM: tl.constexpr, CHUNK: tl.constexpr,
        BN: tl.constexpr, IEEE: tl.constexpr, BITS: tl.constexpr, VALUE_GROUPS: tl.constexpr,
    ):  # fmt: skip
        split, batch_head = tl.program_id(0), tl.program_id(1)
        batch, kv_head = batch_head // kv_heads, batch_head % kv_heads
        position_head = kv_head if POSITION_HEADS > 1 else 0
        column, residual_start = tl.load(COLUMN), tl.load(RESIDUAL_START)  # read, so a graph replays them
        in_group, rows, dims, q, best, total, acc = _group_query(
            Q, sqb, sqh, sqd, batch, kv_head, q_heads, GROUP, GM, DIM
        )
        for offset in range(0, tl.minimum(CHUNK, keys - split * CHUNK), BN):  # blocks past the keys add 0
            cols = split * CHUNK + offset + tl.arange(0, BN)
            inside = cols < keys
            base = batch * spb + position_head * sph + cols * spn
            positions = tl.load(P + base, mask=inside, other=-1)
            seen = tl.load(A + base, mask=inside, other=0) != 0
            if HAS_WINDOW:
                seen = seen & (positions > column - window)
            seen = seen | (inside & (positions == column))
            waiting = (positions >= residual_start)[:, None]  # in the residual window, unquantized
            fresh, coded = seen[:, None] & waiting, seen[:, None] & ~waiting
            # only the slots seen are read, each from the residual window or from its codes; the
            # values only after the scores, so that fewer blocks are live at once
            fresh_rows = (positions - residual_start)[:, None]
            k = _states(RK, batch * srkb + kv_head * srkh, fresh_rows, srkn, srkd, dims, fresh)
            if BITS == 16:
                k_coded = _states(K, batch * skb + kv_head * skh, cols[:, None], skn, skd, dims, coded)
            else:
                # a coded slot that is seen holds a token, quantized into one of its head's key groups
                # (every operand a [BN, 1] column: Triton 3.6 on sm_90 failed to lay out 1-D ones)
                group = tl.load(KG + batch * sgb + kv_head * sgh + cols[:, None] * sgn, mask=coded, other=0)
                table = batch * sksb + kv_head * sksh + group * sksg + dims[None, :]
                k_coded = _codes(K, batch * skb + kv_head * skh + cols[:, None] * skn, coded, BITS, DIM)
                k_coded = k_coded * tl.load(KS + table, mask=coded, other=0.0).to(tl.float32)
                k_coded += tl.load(KZ + table, mask=coded, other=0.0).to(tl.float32)
            k = tl.where(waiting, k, k_coded.to(k.dtype))  # rounded to the model's dtype, as the transient
            scores = dot(q, tl.trans(k), IEEE) * scale
            scores = tl.where(seen[None, :], scores, float("-inf"))
            if WITH_MASS:
                tl.store(SCORES + rows[:, None] * keys + cols[None, :], scores,
                         mask=in_group[:, None] & inside[None, :])  # fmt: skip
            v = _states(RV, batch * srvb + kv_head * srvh, fresh_rows, srvn, srvd, dims, fresh)
            if BITS == 16:
                v_coded = _states(V, batch * svb + kv_head * svh, cols[:, None], svn, svd, dims, coded)
            else:
                # a value's scale and zero are per group of channels: read once a slot and spread over the
                # group's channels (reading them for every channel took twice as long on an H200)
                groups = batch * svsb + kv_head * svsh + cols[:, None] * svsn
                groups += tl.arange(0, VALUE_GROUPS)[None, :]
                v_scale = tl.load(VS + groups, mask=coded, other=0.0).to(tl.float32)[:, :, None]
                v_zero = tl.load(VZ + groups, mask=coded, other=0.0).to(tl.float32)[:, :, None]
                v_coded = _codes(V, batch * svb + kv_head * svh + cols[:, None] * svn, coded, BITS, DIM)
                v_coded = tl.reshape(v_coded, (BN, VALUE_GROUPS, DIM // VALUE_GROUPS)) * v_scale + v_zero
                v_coded = tl.reshape(v_coded, (BN, DIM))
            v = tl.where(waiting, v, v_coded.to(v.dtype))
            best, total, acc = _softmax_step(scores, v, best, total, acc, IEEE)
        _store_partials(
            PART_MAX, PART_SUM, PART_ACC, rows * splits + split, best, total, acc, in_group, dims, DIM
        )


def quantized_decode_attention(
    query: torch.Tensor,
    codes: PackedCodes,
    residual_keys: torch.Tensor,
    residual_values: torch.Tensor,
    residual_start: int | torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor,
    column: int | torch.Tensor,
    sliding_window: int | None,
    scaling: float,
    with_mass: bool,
    add_mass_to: torch.Tensor | None = None,
    softcap: float | None = None,
    explicit: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One decode query per row over its packed slots.

    ``query`` is ``[batch, q_heads, 1, dim]`` (values have ``dim`` channels too); ``codes`` hold
    the rows' slots; ``residual_keys``/``residual_values`` (``[batch, kv_heads, columns, dim]``, the
    model's dtype) the columns from ``residual_start`` on, which a slot at such a column reads
    instead of its codes; ``positions``/``valid`` (``[batch, 1 or kv_heads, slots]``, one layout)
    describe the slots, which must include the query's own ``column`` (seen even if not valid). Returns what
    :func:`~squeezekv.ops.decode_attention` returns over the dequantized slots (the output, and the
    mass ``[batch, kv_heads, slots]`` if ``with_mass``, or added in place to ``add_mass_to``). The
    Triton pair serves it where :func:`squeezekv.ops.attention.fused` allows.
    """
    if fused(query, softcap, explicit):
        return quantized_decode_attention_triton(
            query, codes, residual_keys, residual_values, residual_start, positions, valid, column,
            sliding_window, scaling, with_mass, add_mass_to,
        )  # fmt: skip
    return quantized_decode_attention_torch(
        query, codes, residual_keys, residual_values, residual_start, positions, valid, column,
        sliding_window, scaling, with_mass, add_mass_to, softcap, explicit,
    )  # fmt: skip


def quantized_decode_attention_torch(
    query: torch.Tensor,
    codes: PackedCodes,
    residual_keys: torch.Tensor,
    residual_values: torch.Tensor,
    residual_start: int | torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor,
    column: int | torch.Tensor,
    sliding_window: int | None,
    scaling: float,
    with_mass: bool,
    add_mass_to: torch.Tensor | None = None,
    softcap: float | None = None,
    explicit: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The torch twin of :func:`quantized_decode_attention_triton` (same arguments, same result):
    the slots decoded into a transient copy of the layer, attended as the contiguous twin does."""
    columns = positions.expand(-1, codes.key_codes.shape[1], -1)
    keys, values = codes.states(query.dtype)
    keys = with_residual(keys, residual_keys, columns, residual_start)
    values = with_residual(values, residual_values, columns, residual_start)
    return decode_attention_torch(
        query, keys, values, positions, valid | (positions == column), column, sliding_window, scaling,
        with_mass, add_mass_to, softcap, explicit,
    )  # fmt: skip


def quantized_decode_attention_triton(
    query: torch.Tensor,
    codes: PackedCodes,
    residual_keys: torch.Tensor,
    residual_values: torch.Tensor,
    residual_start: int | torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor,
    column: int | torch.Tensor,
    sliding_window: int | None,
    scaling: float,
    with_mass: bool,
    add_mass_to: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The Triton pair behind :func:`quantized_decode_attention`: the first pass over the codes,
    then :mod:`~squeezekv.ops.decode`'s combine."""
    batch, q_heads, _, dim = query.shape
    kv_heads, keys = codes.key_codes.shape[1], codes.key_codes.shape[2]
    if codes.bits != 16:  # the kernel reads each slot's bytes, scales and zeros as contiguous runs
        packed = (codes.key_codes, codes.value_codes, codes.key_scale, codes.value_scale)
        if any(part.stride(-1) != 1 for part in packed) or (
            codes.key_zero.stride() != codes.key_scale.stride()
            or codes.value_zero.stride() != codes.value_scale.stride()
        ):
            raise ValueError("packed codes and scales must be contiguous in their last dimension")
    group = q_heads // kv_heads
    partials = DecodePartials.for_query(query, kv_heads, keys, with_mass, add_mass_to)
    splits, scores, part_max, part_sum, part_acc = partials[:5]
    valid = valid.view(torch.int8) if valid.dtype == torch.bool else valid
    key_group = codes.key_group if codes.key_group is not None else positions  # no group: never read
    if residual_keys.shape[2] == 0:  # no column waits: any tensor of the dtype and rank (never read)
        residual_keys = residual_values = query
    column, residual_start = (
        torch.as_tensor(value, device=query.device).view(1) for value in (column, residual_start)
    )
    _quantized_decode_chunk[(splits, batch * kv_heads)](
        query, codes.key_codes, codes.key_scale, codes.key_zero, key_group, codes.value_codes,
        codes.value_scale, codes.value_zero, residual_keys, residual_values, positions, valid, scores,
        part_max, part_sum, part_acc,
        query.stride(0), query.stride(1), query.stride(3),
        *codes.key_codes.stride(), *codes.key_scale.stride()[:3], *key_group.stride(),
        *codes.value_codes.stride(), *codes.value_scale.stride()[:3],
        *residual_keys.stride(), *residual_values.stride(), *positions.stride(),
        keys, q_heads, kv_heads, splits, column, residual_start,
        sliding_window or 0, scaling,
        HAS_WINDOW=sliding_window is not None, WITH_MASS=with_mass, POSITION_HEADS=positions.shape[1],
        DIM=dim, GROUP=group, GM=max(16, triton.next_power_of_2(group)), CHUNK=DECODE_CHUNK,
        BN=PACKED_BLOCK, IEEE=query.dtype == torch.float32, BITS=codes.bits,
        VALUE_GROUPS=codes.value_scale.shape[-1], num_warps=DECODE_WARPS,
    )  # fmt: skip
    return partials.combine(kv_heads, keys, add_mass_to)
