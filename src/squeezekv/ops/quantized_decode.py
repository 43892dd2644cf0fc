"""One decode query per sequence over a quantized layer (:mod:`squeezekv.cache.quantized`) that
reads the packed codes themselves: no transient full-precision copy of the layer.

A layer's rows at one precision hold, per slot, packed key and value codes (:mod:`squeezekv.ops.quantize`:
keys per channel over a group of slots, values per token over groups of channels); its newest
columns wait unquantized in a residual window instead. The Triton first pass is
:mod:`~squeezekv.ops.decode`'s with each block of keys and values decoded in registers
(``code * scale + zero``) or, for a slot in the residual window, read from it; the second pass,
which turns the partial softmax states into the output and the mass, is shared as it is. The torch
twin dequantizes the layer as the transient does (in float32, rounded to the query's dtype) and
attends over it. The kernel computes in float16 for bf16 and float16 queries (its scales are float16
already, and a conversion to float32 per code bounded it: an H200 ran its 8-bit call 1.5x faster so),
in float32 for float32 ones, which it matches within float32 rounding.

For 8-bit codes and one query head a key head (Llama-2-7B's shape, where the Triton pass pads its
matrix products from one query row to 16 and spends its time moving operands between layouts), the
first pass is a CUDA kernel instead (``packed8_decode.cu``, compiled at run time by NVRTC), which
gives each thread 16 channels of one slot and keeps a running softmax per group of lanes.

A slot is seen when it holds a token (inside the sliding window, if any) or is the query's own
column, as :func:`~squeezekv.ops.layer_mask` has it. On an H200 (Triton 3.6) the kernel matches its
torch twin (``tests/ops/test_quantized_decode.py``).
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import NamedTuple

import torch

from squeezekv.ops.attention import fused
from squeezekv.ops.common import dot, tl, triton
from squeezekv.ops.decode import DECODE_CHUNK, DecodePartials, decode_attention_torch
from squeezekv.ops.quantize import dequantize_keys, dequantize_values

# slots per step of a program's loop, warps and pipeline stages: on an H200 (Triton 3.6) 16 slots, 2 warps
# and 1 stage beat 32 and 64 slots, 1 and 4 warps and Triton's default 3 stages (more registers a
# program, fewer programs at once)
PACKED_BLOCK = 16
PACKED_WARPS = 2
PACKED_STAGES = 1


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
        _group_rows,
        _softmax_weights,
        _store_partials,
    )

    @triton.jit
    def _in_math(x, BITS: tl.constexpr, IEEE: tl.constexpr):
        """``x`` in the type the kernel computes in: the model's own at 16 bits, else float16 (float32
        for float32 queries, so that they stay exact)."""
        if BITS == 16:
            converted = x
        elif IEEE:
            converted = x.to(tl.float32)
        else:
            converted = x.to(tl.float16)
        return converted

    @triton.jit
    def _read(at, mask, BITS: tl.constexpr, IEEE: tl.constexpr):
        """What lies at the pointers ``at`` where ``mask`` (else 0), in the kernel's math."""
        return _in_math(tl.load(at, mask=mask, other=0.0), BITS, IEEE)

    @triton.jit
    def _exact(codes, IEEE: tl.constexpr, ASM: tl.constexpr):
        """uint8 codes as exact floats of the kernel's math; to float16 without a conversion
        instruction, which bounded the kernel: ``0x6400 | c`` is the float16 ``1024 + c``. On a GPU
        (``ASM``) one byte permute makes two such halves of a register's four codes; Triton's
        interpreter has no assembly, and the same bits made element by element cost four times the
        instructions."""
        if IEEE:
            exact = codes.to(tl.float32)
        elif ASM:
            halves = tl.inline_asm_elementwise(
                "prmt.b32 $0, $2, 0x64646464, 0x4140; prmt.b32 $1, $2, 0x64646464, 0x4342;",
                "=r,=r,r", [codes], dtype=tl.float16, is_pure=True, pack=4,
            )  # fmt: skip
            exact = halves - 1024.0
        else:
            exact = (codes.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True) - 1024.0
        return exact

    @triton.jit
    def _key_half(codes, KS, KZ, table, BITS: tl.constexpr, IEEE: tl.constexpr, ASM: tl.constexpr):
        """``code * scale + zero`` of ``[slots, channels]`` key codes, each slot's scales and zeros
        read from its key group's ``table`` row."""
        key_scale = _in_math(tl.load(KS + table), BITS, IEEE)
        return _exact(codes, IEEE, ASM) * key_scale + _in_math(tl.load(KZ + table), BITS, IEEE)

    @triton.jit
    def _value_half(codes, value_scale, value_zero, VALUE_GROUPS: tl.constexpr, IEEE: tl.constexpr,
                    ASM: tl.constexpr):  # fmt: skip
        """``code * scale + zero`` of ``[slots, channels]`` value codes, a slot's scales and zeros
        (``[slots, VALUE_GROUPS]``) spread over each group's channels."""
        SLOTS: tl.constexpr = codes.shape[0]
        CHANNELS: tl.constexpr = codes.shape[1]
        grouped = tl.reshape(_exact(codes, IEEE, ASM), (SLOTS, VALUE_GROUPS, CHANNELS // VALUE_GROUPS))
        return tl.reshape(grouped * value_scale[:, :, None] + value_zero[:, :, None], (SLOTS, CHANNELS))

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
        ASM: tl.constexpr,
    ):  # fmt: skip
        # a 4-bit byte holds an even channel (low nibble) and the odd one after it: the head is then
        # two halves, the even channels and the odd ones, each with its half of the query and output
        # (a half must give a matrix product 16 channels; a smaller head reads a byte per channel)
        SPLIT: tl.constexpr = BITS == 4 and DIM >= 32
        PER_CHANNEL: tl.constexpr = BITS == 4 and not SPLIT
        # the byte permute pays at 8 bits; on 4-bit halves Triton 3.6 moved the codes through shared
        # memory for it (2.06 against 1.61 ms a call on an H200), and on a byte per channel failed to compile
        PERMUTE: tl.constexpr = ASM and BITS == 8
        WIDTH: tl.constexpr = DIM // 2 if SPLIT else DIM
        STRIDE: tl.constexpr = 2 if SPLIT else 1
        split, batch_head = tl.program_id(0), tl.program_id(1)
        batch, kv_head = batch_head // kv_heads, batch_head % kv_heads
        position_head = kv_head if POSITION_HEADS > 1 else 0
        column, residual_start = tl.load(COLUMN), tl.load(RESIDUAL_START)  # read, so a graph replays them
        in_group, rows, query, best, total = _group_rows(Q, sqb, sqh, batch, kv_head, q_heads, GROUP, GM)
        channels = tl.arange(0, WIDTH)
        even, odd = channels[None, :] * STRIDE, channels[None, :] * 2 + 1  # odd: the second half at 4 bits
        q_even = _read(query + even * sqd, in_group[:, None], BITS, IEEE)
        acc_even = tl.zeros([GM, WIDTH], tl.float32)
        if SPLIT:
            q_odd = _read(query + odd * sqd, in_group[:, None], BITS, IEEE)
            acc_odd = tl.zeros([GM, WIDTH], tl.float32)
        for offset in range(0, tl.minimum(CHUNK, keys - split * CHUNK), BN):  # blocks past the keys add 0
            cols = split * CHUNK + offset + tl.arange(0, BN)
            inside = cols < keys
            # a column past the keys reads the last slot again, unseen, so that no load needs a mask;
            # every load whose address is arithmetic comes first, so that they are in flight together
            # (masked by what a slot holds, they waited for the positions: twice as slow on an H200)
            kept = tl.minimum(cols, keys - 1)
            slots = kept[:, None]
            base = batch * spb + position_head * sph + kept * spn
            positions = tl.load(P + base)
            held = tl.load(A + base)
            keys_at = K + batch * skb + kv_head * skh + slots * skn
            values_at = V + batch * svb + kv_head * svh + slots * svn
            if BITS == 16:
                k_even = tl.load(keys_at + channels[None, :] * skd)
                v_even = tl.load(values_at + channels[None, :] * svd)
            else:
                group = tl.load(KG + batch * sgb + kv_head * sgh + slots * sgn)
                table = batch * sksb + kv_head * sksh + group * sksg + even
                code_bytes = channels[None, :] // 2 if PER_CHANNEL else channels[None, :]
                key_codes = tl.load(keys_at + code_bytes)
                value_codes = tl.load(values_at + code_bytes)
                if PER_CHANNEL:
                    nibble = (channels[None, :] % 2) * 4
                    key_codes, value_codes = (key_codes >> nibble) & 15, (value_codes >> nibble) & 15
                value_groups = batch * svsb + kv_head * svsh + slots * svsn
                value_groups += tl.arange(0, VALUE_GROUPS)[None, :]
                value_scale = _in_math(tl.load(VS + value_groups), BITS, IEEE)
                value_zero = _in_math(tl.load(VZ + value_groups), BITS, IEEE)
                if SPLIT:
                    k_even = _key_half(key_codes & 15, KS, KZ, table, BITS, IEEE, PERMUTE)
                    k_odd = _key_half(key_codes >> 4, KS, KZ, table + 1, BITS, IEEE, PERMUTE)
                else:
                    k_even = _key_half(key_codes, KS, KZ, table, BITS, IEEE, PERMUTE)
            seen = (held != 0) & inside
            if HAS_WINDOW:
                seen = seen & (positions > column - window)
            seen = seen | (inside & (positions == column))
            # a slot of the newest columns reads its key and value from the residual window, unquantized;
            # few blocks hold one, so the others skip those loads
            waiting = (positions >= residual_start)[:, None]
            fresh = seen[:, None] & waiting
            any_fresh = tl.max(fresh.to(tl.int32)) > 0
            window_rows = (positions - residual_start)[:, None]
            if any_fresh:
                window_keys = RK + batch * srkb + kv_head * srkh + window_rows * srkn
                k_even = tl.where(waiting, _read(window_keys + even * srkd, fresh, BITS, IEEE), k_even)
                if SPLIT:
                    k_odd = tl.where(waiting, _read(window_keys + odd * srkd, fresh, BITS, IEEE), k_odd)
            scores = dot(q_even, tl.trans(k_even), IEEE)
            if SPLIT:
                scores += dot(q_odd, tl.trans(k_odd), IEEE)
            scores = tl.where(seen[None, :], scores * scale, float("-inf"))
            if WITH_MASS:
                tl.store(SCORES + rows[:, None] * keys + cols[None, :], scores,
                         mask=in_group[:, None] & inside[None, :])  # fmt: skip
            best, total, p, rescale = _softmax_weights(scores, best, total)
            # the values only after the scores, so that fewer blocks are live at once
            if SPLIT:
                v_even = _value_half(value_codes & 15, value_scale, value_zero, VALUE_GROUPS, IEEE, PERMUTE)
                v_odd = _value_half(value_codes >> 4, value_scale, value_zero, VALUE_GROUPS, IEEE, PERMUTE)
            elif BITS != 16:
                v_even = _value_half(value_codes, value_scale, value_zero, VALUE_GROUPS, IEEE, PERMUTE)
            if any_fresh:
                window_values = RV + batch * srvb + kv_head * srvh + window_rows * srvn
                v_even = tl.where(waiting, _read(window_values + even * srvd, fresh, BITS, IEEE), v_even)
                if SPLIT:
                    v_odd = tl.where(waiting, _read(window_values + odd * srvd, fresh, BITS, IEEE), v_odd)
            # a weight is 0 where a slot is not seen, and every decoded value is finite (float16 scales)
            acc_even = acc_even * rescale[:, None] + dot(p.to(v_even.dtype), v_even, IEEE)
            if SPLIT:
                acc_odd = acc_odd * rescale[:, None] + dot(p.to(v_odd.dtype), v_odd, IEEE)
        part, stored = rows * splits + split, channels * STRIDE
        _store_partials(PART_MAX, PART_SUM, PART_ACC, part, best, total, acc_even, in_group, stored, DIM)
        if SPLIT:
            tl.store(PART_ACC + part[:, None] * DIM + odd, acc_odd, mask=in_group[:, None])


PACKED8_THREADS = 128  # a block of the CUDA pass (its THREADS; packed8_decode.cu says why 128)
_C_TYPES = {torch.int64: "long long", torch.int32: "int", torch.int16: "short"}


def packed8_serves(
    query: torch.Tensor, codes: PackedCodes, residual_keys: torch.Tensor, residual_values: torch.Tensor,
    residual_start: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, column: torch.Tensor,
) -> bool:  # fmt: skip
    """Whether the CUDA first pass serves a call that the Triton pair would: 8-bit codes with key
    groups, one query head a key head, heads of 64 or 128 channels (value groups of 64), a bf16 or
    float16 query on a GPU, every part laid out as the kernel reads it (16-byte runs, slots one
    after another, 32-bit strides), and a torch that compiles CUDA at run time."""
    _, q_heads, _, dim = query.shape
    if not (
        codes.bits == 8
        and codes.key_group is not None
        and codes.key_scale.shape[2] > 0
        and q_heads == codes.key_codes.shape[1]
        and dim in (64, 128)
        and codes.value_scale.shape[-1] == dim // 64
        and query.dtype in (torch.bfloat16, torch.float16)
        and residual_keys.dtype == residual_values.dtype == query.dtype
        and all(part.dtype in _C_TYPES for part in (positions, codes.key_group, column, residual_start))
        and max(codes.key_codes.stride(0), codes.value_codes.stride(0), codes.key_scale.stride(0)) < 2**31
        and _compiles_cuda(query)
    ):
        return False
    runs = (  # (tensor, its stride per slot where that is not its last, strides in whole 16-byte runs)
        (codes.key_codes, dim, codes.key_codes.stride()[:2]),
        (codes.value_codes, dim, codes.value_codes.stride()[:2]),
        (codes.key_scale, None, [2 * s for s in codes.key_scale.stride()[:3]]),
        (codes.key_zero, None, [2 * s for s in codes.key_zero.stride()[:3]]),
        (codes.value_scale, dim // 64, ()),
        (codes.value_zero, dim // 64, ()),
        (codes.key_group, None, ()),  # its slots are its last dimension
        (positions, None, ()),
        (query, None, [2 * s for s in query.stride()[:2]]),
        (residual_keys, None, [2 * s for s in residual_keys.stride()[:3]]),
        (residual_values, None, [2 * s for s in residual_values.stride()[:3]]),
    )
    laid_out = all(
        tensor.stride(-1) == 1
        and (slot_stride is None or tensor.stride(-2) == slot_stride)
        and tensor.data_ptr() % 16 == 0
        and all(stride % 16 == 0 for stride in whole)
        for tensor, slot_stride, whole in runs
    )
    return (
        laid_out
        and valid.stride() == positions.stride()
        and codes.key_zero.stride() == codes.key_scale.stride()
    )


def _compiles_cuda(query: torch.Tensor) -> bool:
    """Whether ``query`` is on a GPU and this torch compiles CUDA at run time."""
    return query.is_cuda and _has_nvrtc()


@functools.cache
def _has_nvrtc() -> bool:
    """torch's NVRTC wrapper (a private API, torch >= 2.8) and the NVRTC library it loads."""
    if not hasattr(torch.cuda, "_compile_kernel"):
        return False
    try:
        torch.cuda._utils._get_gpu_rtc_library()
    except (OSError, RuntimeError):
        return False
    return True


@functools.cache
def _packed8_kernel(device: int, dim: int, types: tuple[str, ...], bf16: bool, window: bool, mass: bool):
    """``packed8_decode.cu`` compiled (once per device and variant) with its macros."""
    names = ("POSITION", "KEY_GROUP", "COLUMN", "RESIDUAL_START")
    macros = dict(zip(names, types, strict=True), THREADS=PACKED8_THREADS, CHUNK=DECODE_CHUNK, DIM=dim,
                  BF16=int(bf16), HAS_WINDOW=int(window), WITH_MASS=int(mass))  # fmt: skip
    source = resources.files("squeezekv.ops").joinpath("packed8_decode.cu").read_text()
    defines = "".join(f"#define {name} {value}\n" for name, value in macros.items())
    with torch.cuda.device(device):
        return torch.cuda._compile_kernel(defines + source, "packed8_decode_chunk")


def _packed8_first_pass(
    query: torch.Tensor, codes: PackedCodes, residual_keys: torch.Tensor, residual_values: torch.Tensor,
    residual_start: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, column: torch.Tensor,
    sliding_window: int | None, scaling: float, partials: DecodePartials,
) -> None:  # fmt: skip
    """The CUDA first pass (see :func:`packed8_serves`), writing ``partials`` as the Triton one does."""
    batch, heads, _, dim = query.shape
    keys = codes.key_codes.shape[2]
    types = tuple(_C_TYPES[part.dtype] for part in (positions, codes.key_group, column, residual_start))
    kernel = _packed8_kernel(
        query.device.index or 0, dim, types, query.dtype == torch.bfloat16, sliding_window is not None,
        partials.mass is not None,
    )  # fmt: skip
    position_heads = positions.stride(1) if positions.shape[1] > 1 else 0
    kernel(
        grid=(partials.splits, batch * heads, 1),
        block=(PACKED8_THREADS, 1, 1),
        args=[
            query, codes.key_codes, codes.key_scale, codes.key_zero, codes.key_group, codes.value_codes,
            codes.value_scale, codes.value_zero, residual_keys, residual_values, positions, valid,
            partials.scores, partials.part_max, partials.part_sum, partials.part_acc,
            query.stride(0), query.stride(1), *codes.key_codes.stride()[:2], *codes.key_scale.stride()[:3],
            *codes.key_group.stride()[:2], *codes.value_codes.stride()[:2], *codes.value_scale.stride()[:2],
            *residual_keys.stride()[:3], *residual_values.stride()[:3], positions.stride(0), position_heads,
            keys, heads, partials.splits, column, residual_start, sliding_window or 0,
            float(scaling),
        ],
    )  # fmt: skip


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
    """The Triton pair behind :func:`quantized_decode_attention`: the first pass over the codes
    (the CUDA one where :func:`packed8_serves`), then :mod:`~squeezekv.ops.decode`'s combine."""
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
    if packed8_serves(query, codes, residual_keys, residual_values, residual_start, positions, valid, column):
        _packed8_first_pass(
            query, codes, residual_keys, residual_values, residual_start, positions, valid, column,
            sliding_window, scaling, partials,
        )  # fmt: skip
        return partials.combine(kv_heads, keys, add_mass_to)
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
        VALUE_GROUPS=codes.value_scale.shape[-1], ASM=query.is_cuda, num_warps=PACKED_WARPS,
        num_stages=PACKED_STAGES,
    )  # fmt: skip
    return partials.combine(kv_heads, keys, add_mass_to)
