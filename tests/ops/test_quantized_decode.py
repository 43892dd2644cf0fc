"""The decode op over a quantized layer's packed codes: the Triton kernel against its torch twin,
the twin against attention over the layer's transient copy (the prefill op's path), and generation
through the kernel against the torch path.

Without a GPU the Triton side runs in Triton's interpreter (``tests/conftest.py`` turns it on).
"""

from __future__ import annotations

import copy

import pytest
import torch

import squeezekv
from squeezekv import SqueezeConfig
from squeezekv.cache.dynamic import SqueezeCache
from squeezekv.cache.quantized import PackedStates
from squeezekv.ops import common, quantize, quantized_decode
from squeezekv.ops.prefill import prefill_attention_torch
from squeezekv.ops.quantize import KEY_GROUP_TOKENS

from models import left_pad, prompts, tiny_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KV_HEADS, DIM = 2, 16
needs_triton = pytest.mark.skipif(common.triton is None, reason="needs Triton")
needs_gpu = pytest.mark.skipif(
    DEVICE == "cpu", reason="bf16 products need a GPU (the interpreter's are wrong)"
)


def quantized_layer(
    bits: list[int], group: int, per_head: bool, seed: int, prompt: int = 150, dtype=torch.float32,
    dim: int = DIM, key_group: int = KEY_GROUP_TOKENS,
):  # fmt: skip
    """A layer of ``len(bits)`` rows quantized after a ``prompt`` of which about 70 % is kept (each
    head its own columns when ``per_head``: heads get different numbers of key groups of
    ``key_group`` tokens), then 6
    decode tokens waiting in the residual window (one of them evicted); a query at the last column.
    Returns the query, the packed states and the layer's positions, validity and query column."""
    generator = torch.Generator().manual_seed(seed)
    batch, heads, new = len(bits), KV_HEADS if per_head else 1, 6

    def states(columns: int, spread: torch.Tensor | float = 1.0) -> torch.Tensor:
        drawn = torch.randn(batch, KV_HEADS, columns, dim, generator=generator) * spread
        return drawn.to(DEVICE, dtype)

    positions = torch.arange(prompt + new).repeat(batch, heads, 1).to(DEVICE)  # valid's layout
    valid = torch.rand(batch, heads, prompt + new, generator=generator) > 0.3
    valid[0, 0, : prompt // 2] = False  # one head holds half the others' tokens: fewer key groups
    valid[:, :, prompt:] = True
    valid[:, :, prompt + 1] = False  # evicted from the residual window
    valid = valid.to(DEVICE)
    prompt_positions, prompt_valid = positions[..., :prompt], valid[..., :prompt]
    keys = states(prompt, torch.linspace(0.5, 4, dim))  # channels of different ranges
    packed = PackedStates(
        keys, states(prompt), prompt_positions, prompt_valid, prompt, torch.tensor(bits), key_group
    )
    packed.store(states(new), states(new))
    query = torch.randn(batch, KV_HEADS * group, 1, dim, generator=generator).to(DEVICE, dtype)
    return query, packed, positions, valid, prompt + new - 1


def arguments(packed: PackedStates, positions: torch.Tensor) -> tuple:
    """One precision's codes and the residual window, as the op takes them."""
    codes = packed.parts[0].codes(packed.per_head(positions))
    return codes, packed.residual_keys, packed.residual_values, packed.residual_start


@needs_triton
@pytest.mark.parametrize(
    ("bits", "group", "per_head", "window", "mass", "dtype", "dim"),
    [
        (8, 1, False, None, "none", torch.float32, DIM),
        (4, 3, True, None, "returned", torch.float32, DIM),
        (8, 3, True, 40, "added", torch.float32, DIM),
        (4, 1, False, 40, "returned", torch.float32, DIM),
        (4, 3, True, 40, "added", torch.float32, 64),  # even and odd channels as two halves
        (16, 3, True, 40, "returned", torch.float32, DIM),
        (8, 3, True, 40, "returned", torch.float16, DIM),  # float16 math and codes made by bits
        (4, 1, False, None, "added", torch.float16, 64),
        pytest.param(4, 3, True, 40, "returned", torch.bfloat16, DIM, marks=needs_gpu),
        pytest.param(4, 1, False, None, "returned", torch.bfloat16, 64, marks=needs_gpu),
        pytest.param(8, 1, False, None, "added", torch.bfloat16, DIM, marks=needs_gpu),
    ],
)
def test_quantized_decode_triton_matches_its_torch_twin(bits, group, per_head, window, mass, dtype, dim):
    """Within float32 rounding; in bf16 and float16 within their rounding of the twin in float32 over
    the same codes (the kernel computes in float16, more exactly than the twin's bf16 products). The
    4-bit layers hold more slots than one program's chunk, so their first pass is split; a head of 64
    channels reads 4-bit codes as two halves, a smaller one a byte a channel."""
    prompt = quantized_decode.DECODE_CHUNK + 40 if bits == 4 else 150
    query, packed, positions, valid, column = quantized_layer(
        [bits, bits], group, per_head, seed=bits + group, prompt=prompt, dtype=dtype, dim=dim
    )
    codes, residual_keys, residual_values, start = arguments(packed, positions)
    running = torch.rand(2, KV_HEADS, positions.shape[-1], device=DEVICE)
    results = []
    for side, states in (
        (quantized_decode.quantized_decode_attention_torch, torch.float32),
        (quantized_decode.quantized_decode_attention_triton, dtype),
    ):
        added = running.clone() if mass == "added" else None
        output, returned = side(
            query.to(states), codes, residual_keys.to(states), residual_values.to(states), start, positions,
            valid, column, window, 0.3, mass != "none", added,
        )  # fmt: skip
        results.append((output.float(), returned, added))
    (want, want_mass, want_added), (got, got_mass, got_added) = results
    close = dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got, want, **close)
    if mass == "returned":
        torch.testing.assert_close(got_mass, want_mass, **close)
        assert got_mass[~valid.expand_as(got_mass)].abs().max() == 0
    else:
        assert got_mass is None and want_mass is None
    if mass == "added":
        torch.testing.assert_close(got_added, want_added, **close)


@needs_triton
def test_rows_at_different_precisions_each_read_their_own_codes(monkeypatch):
    """The layer's op, once per precision, through the kernel against the torch twin."""
    query, packed, positions, valid, column = quantized_layer([4, 16, 8], 3, True, seed=9, prompt=70)
    monkeypatch.setattr(quantized_decode, "fused", lambda *unused: False)
    want = packed.decode_attention(query, positions, valid, column, 40, 0.3, True, None, False)
    monkeypatch.setattr(quantized_decode, "fused", lambda *unused: True)
    got = packed.decode_attention(query, positions, valid, column, 40, 0.3, True, None, False)
    for got_part, want_part in zip(got, want, strict=True):
        torch.testing.assert_close(got_part, want_part, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(("bits", "group", "per_head", "window"), [(8, 3, True, None), (4, 1, False, 40)])
def test_the_torch_twin_is_attention_over_the_transient_copy(bits, group, per_head, window):
    """Against the prefill op's torch path over :meth:`PackedStates.states` (what a decode step ran
    before): the same numbers (bit for bit on the CPU), the mass included; also with a padding query,
    which still sees its own token and gives no mass."""
    query, packed, positions, valid, column = quantized_layer([bits, 16], group, per_head, seed=5)
    valid[1, :, -1] = False  # the second row's query is padding
    keys, values = packed.states(positions)
    query_valid = torch.tensor([[True], [False]], device=DEVICE)
    want, want_mass = prefill_attention_torch(
        query, keys, values, positions, valid, column, window, 0.3, 1, query_valid
    )
    got, got_mass = packed.decode_attention(query, positions, valid, column, window, 0.3, True, None, False)
    got_mass = got_mass * query_valid.view(-1, 1, 1)
    if DEVICE == "cpu":
        assert torch.equal(got, want) and torch.equal(got_mass, want_mass)
    else:  # cuBLAS picks its reduction order by shape, so the last bit may differ
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(got_mass, want_mass, atol=1e-6, rtol=1e-5)


@needs_triton
def test_generation_through_the_kernel_equals_the_transient_path(monkeypatch):
    """Two padded prompts at 8 bits under H2O (mass every step) on a model with a sliding window;
    key groups of 5 tokens, so that the residual window is quantized twice. The same tokens through
    the transient copy (the path before: built at every decode step), the torch twin and the Triton
    kernel (on the CPU: in Triton's interpreter), neither of which calls :meth:`PackedStates.states`
    (the twin decodes each precision's rows itself)."""
    model = copy.deepcopy(tiny_model("mistral")).float().to(DEVICE)  # a sliding window of 24
    ids, mask = left_pad(prompts([30, 21], seed=3))
    steps = 12
    monkeypatch.setattr(quantize, "KEY_GROUPS", (*quantize.KEY_GROUPS, 5))  # a group the tests alone take
    states = PackedStates.states
    transients = []
    monkeypatch.setattr(PackedStates, "states", lambda *args: transients.append(1) or states(*args))

    def generate() -> torch.Tensor:
        transients.clear()
        config = SqueezeConfig(0.6, "h2o", kv_bits=8, kv_group=5)
        with squeezekv.compress(model, config, max_new_tokens=steps) as session:
            tokens = model.generate(
                ids.to(DEVICE), attention_mask=mask.to(DEVICE), max_new_tokens=steps, do_sample=False
            )
            assert session.cache.layers[0].packed.residual_start == ids.shape[1] + 10  # quantized twice
        return tokens

    with monkeypatch.context() as before:
        before.setattr(SqueezeCache, "reads_codes", lambda *unused: False)
        expected = generate()
    assert len(transients) == (steps - 1) * model.config.num_hidden_layers  # each decode step's layers
    monkeypatch.setattr(quantized_decode, "fused", lambda *unused: False)
    twin = generate()
    assert not transients
    monkeypatch.setattr(quantized_decode, "fused", lambda *unused: True)
    got = generate()
    assert not transients
    assert torch.equal(twin, expected)
    assert torch.equal(got, expected)


@needs_triton
def test_the_column_and_the_window_start_may_be_device_tensors():
    """As the fast engine passes them, so that a captured step reads each replay's values."""
    query, packed, positions, valid, column = quantized_layer([8, 8], 3, True, seed=4)
    codes, keys, values, start = arguments(packed, positions)
    on_device = (torch.tensor([start], device=DEVICE), torch.tensor([column], device=DEVICE))
    results = [
        quantized_decode.quantized_decode_attention_triton(
            query, codes, keys, values, first, positions, valid, last, 40, 0.3, True
        )
        for first, last in ((start, column), on_device)
    ]
    for got, want in zip(*results, strict=True):
        assert torch.equal(got, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA pass needs a GPU")
@pytest.mark.parametrize(
    ("dtype", "dim", "per_head", "window", "mass", "prompt", "key_group"),
    [
        (torch.bfloat16, 128, False, None, "added", 150, KEY_GROUP_TOKENS),
        (torch.bfloat16, 128, True, 40, "returned", quantized_decode.DECODE_CHUNK + 40, KEY_GROUP_TOKENS),
        (torch.float16, 64, True, None, "returned", quantized_decode.DECODE_CHUNK + 40, KEY_GROUP_TOKENS),
        (torch.float16, 64, False, 40, "none", 150, KEY_GROUP_TOKENS),
        (torch.bfloat16, 128, True, None, "returned", quantized_decode.DECODE_CHUNK + 40, 16),
    ],
)
def test_the_cuda_pass_matches_the_triton_pass_and_the_twin(
    monkeypatch, dtype, dim, per_head, window, mass, prompt, key_group
):
    """8 bits, one query head a key head: the CUDA first pass serves the call, and gives what the
    Triton pass and the torch twin (in float32 over the same codes) give, within float16 rounding;
    split over chunks, with the residual window, a sliding window, the mass, and key groups of 16."""
    query, packed, positions, valid, column = quantized_layer(
        [8, 8], 1, per_head, seed=dim, prompt=prompt, dtype=dtype, dim=dim, key_group=key_group
    )
    codes, residual_keys, residual_values, start = arguments(packed, positions)
    start_at, column_at = (torch.tensor([value], device=DEVICE) for value in (start, column))
    serves = quantized_decode.packed8_serves
    assert serves(query, codes, residual_keys, residual_values, start_at, positions, valid, column_at)
    running = torch.rand(2, KV_HEADS, positions.shape[-1], device=DEVICE)

    def run(side, states) -> tuple:
        added = running.clone() if mass == "added" else None
        output, returned = side(
            query.to(states), codes, residual_keys.to(states), residual_values.to(states), start, positions,
            valid, column, window, 0.3, mass != "none", added,
        )  # fmt: skip
        return output.float(), returned, added

    cuda = run(quantized_decode.quantized_decode_attention_triton, dtype)
    want = run(quantized_decode.quantized_decode_attention_torch, torch.float32)
    monkeypatch.setattr(quantized_decode, "packed8_serves", lambda *unused: False)
    triton_pass = run(quantized_decode.quantized_decode_attention_triton, dtype)
    for other in (want, triton_pass):
        for got_part, want_part in zip(cuda, other, strict=True):
            if want_part is None:
                assert got_part is None
            else:
                torch.testing.assert_close(got_part, want_part, atol=2e-2, rtol=2e-2)
    if mass == "returned":
        assert cuda[1][~valid.expand_as(cuda[1])].abs().max() == 0


@pytest.mark.parametrize(
    ("bits", "group", "dim", "dtype", "serves"),
    [
        (8, 1, 128, torch.bfloat16, True),
        (8, 1, 64, torch.float16, True),
        (4, 1, 128, torch.bfloat16, False),  # 4 bits: the Triton pass
        (8, 3, 128, torch.bfloat16, False),  # grouped-query heads: the Triton pass
        (8, 1, DIM, torch.bfloat16, False),  # a head of 16 channels
        (8, 1, 128, torch.float32, False),  # float32 math
    ],
)
def test_the_cuda_pass_serves_8_bits_with_one_query_head_a_key_head(
    monkeypatch, bits, group, dim, dtype, serves
):
    """The one rule that picks the CUDA first pass (given a GPU and a torch that compiles CUDA at run
    time); codes that do not start on 16 bytes take the Triton pass."""
    monkeypatch.setattr(quantized_decode, "_compiles_cuda", lambda query: True)
    query, packed, positions, valid, column = quantized_layer(
        [bits, bits], group, False, seed=3, dtype=dtype, dim=dim
    )
    codes, residual_keys, residual_values, start = arguments(packed, positions)
    start_at, column_at = torch.tensor([start]), torch.tensor([column])
    rest = (residual_keys, residual_values, start_at, positions, valid, column_at)
    assert quantized_decode.packed8_serves(query, codes, *rest) is serves
    shifted = torch.empty(codes.key_codes.numel() + 1, dtype=torch.uint8)[1:].view_as(codes.key_codes)
    assert not quantized_decode.packed8_serves(query, codes._replace(key_codes=shifted), *rest)
