import pytest
import torch

from squeezekv.ops.quantize import (
    check_bits,
    check_group,
    cost_in_16bit_tokens,
    dequantize_keys,
    dequantize_values,
    pack,
    quantize_key_groups,
    quantize_values,
    token_bytes,
    tokens_per_16bit_token,
    tokens_within,
    unpack,
    value_group,
    window_error,
)


def states(*shape: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    outliers = torch.randn(shape[-1], generator=generator).abs() * 8  # a few large channels, as keys have
    return torch.randn(*shape, generator=generator) * (1 + outliers)


@pytest.mark.parametrize("bits", [8, 4])
def test_keys_round_trip_within_half_a_step_of_their_group_and_channel(bits):
    keys = states(2, 3, 50, 16)
    group = (torch.arange(50) // 20).expand(2, 3, 50).clone()
    group[0, 1, 7] = -1  # left out: code 0, and no part in any scale
    codes, scale, zero = quantize_key_groups(keys, group, 3, bits)
    assert codes.dtype == torch.uint8 and codes.shape[-1] == 16 * bits // 8
    decoded = dequantize_keys(codes, scale, zero, group, bits, torch.float32)
    for g in range(3):
        inside = (group == g).unsqueeze(-1)
        spread = torch.where(inside, keys, -torch.inf).amax(2) - torch.where(inside, keys, torch.inf).amin(2)
        step = spread / (2**bits - 1)  # per (sequence, head, channel)
        error = torch.where(inside, (decoded - keys).abs(), 0).amax(2)
        assert (error <= step / 2 * 1.01 + 1e-3 * keys.abs().amax()).all()


@pytest.mark.parametrize("bits", [8, 4])
def test_values_round_trip_within_half_a_step_of_their_token(bits):
    values = states(2, 3, 50, 40)
    codes, scale, zero = quantize_values(values, bits)
    assert scale.shape == (2, 3, 50, 40 // value_group(40)) and codes.shape[-1] == 40 * bits // 8
    decoded = dequantize_values(codes, scale, zero, bits, torch.float32)
    step = (values.amax(-1) - values.amin(-1)) / (2**bits - 1)  # one group of 40 channels
    assert ((decoded - values).abs().amax(-1) <= step / 2 * 1.01 + 1e-3 * values.abs().amax()).all()


def test_four_bit_codes_pack_two_to_a_byte():
    codes = torch.randint(0, 16, (3, 8), dtype=torch.uint8)
    packed = pack(codes, 4)
    assert packed.shape == (3, 4) and torch.equal(unpack(packed, 4), codes)
    assert torch.equal(packed[0, 0], codes[0, 0] | (codes[0, 1] << 4))


def test_token_bytes_count_codes_scales_and_zeros():
    assert token_bytes(16, 40, 40) == 160
    # 40 + 40 code bytes, a float16 scale and zero per key channel over 64 tokens, one pair per value
    assert token_bytes(8, 40, 40) == 80 + 40 * 4 / 64 + 4
    assert token_bytes(4, 64, 64) == 64 + 64 * 4 / 64 + 4
    assert tokens_per_16bit_token(8, 128, 128) == pytest.approx(512 / 272)
    # a key group of 16 tokens: four times the key scale bytes a token
    assert token_bytes(8, 40, 40, group=16) == 80 + 40 * 4 / 16 + 4


def test_a_smaller_key_group_makes_the_window_cheaper():
    """At 76 16-bit tokens (the reference model at b = 0.1), groups of 64 leave 13 tokens' bytes
    after their window and groups of 16 leave 61, for more tokens despite the scales."""
    budget, bits = torch.tensor([76.0]), torch.tensor([8.0])
    wide, narrow = tokens_within(budget, bits, (40, 40)), tokens_within(budget, bits, (40, 40), 16)
    assert float(wide) == int(13 * 160 / token_bytes(8, 40, 40))
    assert float(narrow) == int(61 * 160 / token_bytes(8, 40, 40, 16)) > 4 * float(wide)
    for group, tokens in ((64, wide), (16, narrow)):  # and never cost more than the budget
        assert float(cost_in_16bit_tokens(tokens, bits, (40, 40), group)) <= 76
    assert "take a smaller kv_group (16, 32)" in str(window_error(60, 4, 64))
    assert "smaller kv_group" not in str(window_error(10, 4, 16))


@pytest.mark.parametrize("bad", [24, 0, "16", 16.0, True])
def test_bad_key_groups_are_refused_naming_the_value_and_what_is_allowed(bad):
    with pytest.raises(
        ValueError, match=rf"kv_group={bad!r} is not supported; choose one of 16, 32, 64, 128"
    ):
        check_group(bad)


@pytest.mark.parametrize("bad", [12, 2, 32, "8", 8.0, True])
def test_bad_bits_are_refused_naming_the_value_and_what_is_allowed(bad):
    with pytest.raises(ValueError, match=rf"kv_bits={bad!r} is not supported; choose one of 16, 8, 4"):
        check_bits(bad)
