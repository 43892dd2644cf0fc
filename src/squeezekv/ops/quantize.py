"""Integer codes for cached keys and values, in KIVI's layout (arXiv 2402.02750), and what they cost.

Keys vary most across channels (a few channels carry large values), so a key's scale and zero are
per channel, shared by a group of up to ``group`` consecutive kept tokens (``kv_group``, 64 by
default; the newest tokens wait unquantized until a group's columns have arrived); values
vary most across tokens, so a value's scale and zero are per token, over groups of
:func:`value_group` channels. Codes are asymmetric and unsigned (``x ≈ code * scale + zero``),
scales and zeros float16, and 4-bit codes are packed two to a byte (the even channel in the low
nibble). ``bits=16`` means no quantization: the model's own dtype.

These are torch functions. A one-token decode step on a GPU reads the codes themselves, dequantizing in
registers (:mod:`squeezekv.ops.quantized_decode`);
prefill and multi-token forwards dequantize one layer at a time to a transient full-precision
tensor (:mod:`squeezekv.cache.quantized`).
"""

from __future__ import annotations

import torch

BITS = (16, 8, 4)
KEY_GROUP_TOKENS = 64  # the default key group (tokens sharing a key scale and zero per channel)
KEY_GROUPS = (16, 32, 64, 128)  # the key groups a cache may take; each is also its residual window
VALUE_GROUP_LIMIT = 64  # the widest channel group sharing a value scale and zero
SCALE_DTYPE = torch.float16


def check_bits(bits: object) -> int:
    """``bits`` as an int, or a ValueError naming the value and what is allowed."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in BITS:
        raise ValueError(f"kv_bits={bits!r} is not supported; choose one of {', '.join(map(str, BITS))}")
    return bits


def check_group(group: object) -> int:
    """``group`` (tokens a key group) as an int, or a ValueError naming the value and what is allowed."""
    if isinstance(group, bool) or not isinstance(group, int) or group not in KEY_GROUPS:
        raise ValueError(
            f"kv_group={group!r} is not supported; choose one of {', '.join(map(str, KEY_GROUPS))} "
            "(tokens sharing a key scale, also the residual window's columns)"
        )
    return group


def value_group(dim: int) -> int:
    """The channels sharing a value's scale and zero: the largest divisor of ``dim`` up to
    :data:`VALUE_GROUP_LIMIT` (40 for a head of 40, 64 for 128)."""
    return max(size for size in range(1, min(dim, VALUE_GROUP_LIMIT) + 1) if dim % size == 0)


def token_bytes(bits: int, key_dim: int, value_dim: int, group: int = KEY_GROUP_TOKENS) -> float:
    """Bytes one quantized token costs per key-value head at ``bits``, scales and zeros included
    (a key group's are shared by ``group`` tokens); 16 bits is two bytes an element. Each group's
    first column (4 bytes) is left out: under 0.4 % of a group of 16."""
    if bits == 16:
        return 2.0 * (key_dim + value_dim)
    scale_bytes = 2 * torch.finfo(SCALE_DTYPE).bits // 8  # a scale and a zero
    keys = key_dim * bits / 8 + key_dim * scale_bytes / group
    values = value_dim * bits / 8 + value_dim // value_group(value_dim) * scale_bytes
    return keys + values


def tokens_per_16bit_token(bits: int, key_dim: int, value_dim: int, group: int = KEY_GROUP_TOKENS) -> float:
    """How many quantized tokens at ``bits`` cost what one 16-bit token costs (1.85 at 8 bits and
    3.44 at 4 for heads of 40 in groups of 64; 1.88 and 3.56 for heads of 64 or 128)."""
    return token_bytes(16, key_dim, value_dim) / token_bytes(bits, key_dim, value_dim, group)


def cost_in_16bit_tokens(
    tokens: torch.Tensor, bits: torch.Tensor, head_dims: tuple[int, int], group: int = KEY_GROUP_TOKENS
) -> torch.Tensor:
    """The most that layers holding ``tokens`` at ``bits`` (float64 tensors of one shape) can cost,
    in 16-bit tokens: every slot's codes and scales, plus a residual window of up to ``group - 1``
    columns waiting unquantized (their slots hold empty codes meanwhile, and a column evicted from
    the window keeps its bytes until the window is flushed)."""
    return torch.where(bits == 16, tokens, tokens / ratios(bits, head_dims, group) + (group - 1))


def tokens_within(
    budget: torch.Tensor, bits: torch.Tensor, head_dims: tuple[int, int], group: int = KEY_GROUP_TOKENS
) -> torch.Tensor:
    """The most tokens at ``bits`` whose :func:`cost_in_16bit_tokens` stays within ``budget``
    16-bit tokens (float64 tensors of one shape; whole tokens as float64, below 1 where the residual
    window alone takes the budget)."""
    quantized = (budget - (group - 1)) * ratios(bits, head_dims, group)
    return torch.floor(torch.where(bits == 16, budget, quantized) + 1e-9)


def ratios(bits: torch.Tensor, head_dims: tuple[int, int], group: int = KEY_GROUP_TOKENS) -> torch.Tensor:
    """:func:`tokens_per_16bit_token` of every entry of ``bits`` (float64, the shape of ``bits``)."""
    flat = [tokens_per_16bit_token(int(b), *head_dims, group) for b in bits.flatten().tolist()]
    return torch.tensor(flat, dtype=torch.float64).view(bits.shape)


def window_error(budget: float, bits: int, group: int = KEY_GROUP_TOKENS) -> ValueError:
    """The one error for an equal-bytes budget that cannot pay for a quantized layer's window."""
    smaller = [g for g in KEY_GROUPS if g < group]
    return ValueError(
        f"a budget of {budget:g} 16-bit tokens per layer cannot hold kv_bits={bits}: its residual window "
        f"alone may take {group - 1} unquantized tokens; raise the budget"
        + (f", take a smaller kv_group ({', '.join(map(str, smaller))})" if smaller else "")
        + " or leave kv_bits at 16"
    )


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes in ``[0, 2**bits)``, two to a byte along the last dimension at 4 bits."""
    if bits == 8:
        return codes
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The codes :func:`pack` packed, as uint8."""
    if bits == 8:
        return packed
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)


def scale_and_zero(low: torch.Tensor, high: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float16 scale and zero mapping ``[low, high]`` onto the codes (scale 0 where they are equal)."""
    return ((high - low) / (2**bits - 1)).to(SCALE_DTYPE), low.to(SCALE_DTYPE)


def encode(states: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Packed codes of ``states`` under (broadcast) ``scale`` and ``zero``, the float16 ones that
    decoding uses, so that a code is the nearest to its value."""
    scale, zero = scale.float(), zero.float()
    steps = (states.float() - zero) / torch.where(scale > 0, scale, 1.0)
    codes = steps.round().clamp(0, 2**bits - 1).to(torch.uint8)
    return pack(codes, bits)


def decode(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, dtype) -> torch.Tensor:
    """``code * scale + zero`` in ``dtype`` (computed in float32)."""
    return (unpack(packed, bits).float() * scale.float() + zero.float()).to(dtype)


def quantize_key_groups(
    keys: torch.Tensor, group: torch.Tensor, groups: int, bits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys ``[batch, heads, slots, dim]`` quantized per channel over groups of slots.

    ``group`` (``[batch, heads, slots]``, int64) is each slot's group in ``[0, groups)``, or -1 for
    a slot left out (its code is 0). Returns the packed codes and the ``[batch, heads, groups,
    dim]`` scales and zeros (a group without slots gets 0 and 0).
    """
    batch, heads, _, dim = keys.shape
    index = torch.where(group >= 0, group, groups).unsqueeze(-1).expand_as(keys)  # -1: a spare group
    bounds = keys.new_zeros(batch, heads, groups + 1, dim, dtype=torch.float32)
    low = bounds.scatter_reduce(2, index, keys.float(), "amin", include_self=False)[:, :, :groups]
    high = bounds.scatter_reduce(2, index, keys.float(), "amax", include_self=False)[:, :, :groups]
    scale, zero = scale_and_zero(low, high, bits)
    slot_scale, slot_zero = (
        torch.cat([part, part.new_zeros(batch, heads, 1, dim)], 2).gather(2, index) for part in (scale, zero)
    )
    return encode(keys, slot_scale, slot_zero, bits), scale, zero


def dequantize_keys(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: torch.Tensor, bits: int, dtype
) -> torch.Tensor:
    """Keys from :func:`quantize_key_groups`' codes, each slot decoded with its ``group``'s scale."""
    index = group.clamp(min=0).long().unsqueeze(-1).expand(*group.shape, scale.shape[-1])
    return decode(codes, scale.gather(2, index), zero.gather(2, index), bits, dtype)


def quantize_values(values: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Values ``[..., dim]`` quantized per token over groups of :func:`value_group` channels: the
    packed codes and the ``[..., dim / group]`` scales and zeros."""
    grouped = values.float().unflatten(-1, (-1, value_group(values.shape[-1])))
    scale, zero = scale_and_zero(grouped.amin(-1), grouped.amax(-1), bits)
    codes = encode(grouped, scale.unsqueeze(-1), zero.unsqueeze(-1), bits)
    return codes.flatten(-2), scale, zero


def dequantize_values(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, dtype):
    """Values from :func:`quantize_values`' codes."""
    grouped = codes.unflatten(-1, (scale.shape[-1], -1))
    return decode(grouped, scale.unsqueeze(-1), zero.unsqueeze(-1), bits, dtype).flatten(-2)
