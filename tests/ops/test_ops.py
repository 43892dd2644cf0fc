"""Every Triton kernel against its torch twin: the same arguments give the same results and the same
in-place changes.

bf16 matrix products need a GPU (Triton's interpreter computes them wrongly); the rest run anywhere
Triton is installed: without a GPU, in Triton's interpreter (``tests/conftest.py`` turns it on).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch

from squeezekv.ops import common, cosine, decode, eviction, gather, prefill, slots

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"


@dataclass
class Case:
    """Arguments for one run of a pair; tensors are copied to the device for each side, so in-place
    work compares (``args`` may instead be a function that builds them there, to keep strided views).

    ``tolerance``: ``assert_close`` keywords (exact equality when empty); ``rows``: which entries of
    the first output count (padding queries' outputs are never used); ``check``: a further check on
    the torch side's arguments after the run; ``keywords``: passed to both sides by name.
    """

    args: tuple | Callable[[], list]
    tolerance: dict = field(default_factory=dict)
    gpu: bool = False
    rows: torch.Tensor | None = None
    check: Callable[[tuple], None] | None = None
    keywords: dict = field(default_factory=dict)


def prefill_case(seed, batch=2, kv_heads=2, group=2, cached=37, queries=70, dim=16, per_head=False):
    generator = torch.Generator().manual_seed(seed)
    keys = cached + queries
    heads = kv_heads if per_head else 1
    query = torch.randn(batch, kv_heads * group, queries, dim, generator=generator)
    key = torch.randn(batch, kv_heads, keys, dim, generator=generator)
    value = torch.randn(batch, kv_heads, keys, dim, generator=generator)
    old = torch.sort(torch.randperm(cached * 2, generator=generator)[:cached]).values
    first_column = cached * 2 + 3
    positions = torch.cat([old, torch.arange(first_column, first_column + queries)]).expand(batch, heads, -1)
    valid = torch.rand(batch, heads, keys, generator=generator) > 0.25
    valid[..., cached:] = True
    valid[0, :, cached : cached + 5] = False  # a padded row: its first queries are padding
    query_valid = valid[:, 0, cached:].clone()
    return query, key, value, positions.contiguous(), valid, first_column, query_valid


def prefill_cases():
    """Padded rows, windows, per-head positions, every query scored or the last few; the longer
    cases span several blocks of rows and keys, so that blocks off the diagonal take the kernels'
    unmasked path."""
    close = dict(atol=2e-5, rtol=1e-4)
    for per_head in (False, True):
        for window in (None, 29):
            for scored in (70, 9):
                query, key, value, positions, valid, first_column, query_valid = prefill_case(
                    0, per_head=per_head
                )
                args = (query, key, value, positions, valid, first_column, window, 0.3, scored, query_valid)
                real = query_valid[:, None, :, None].expand_as(query)
                yield f"per_head={per_head}-window={window}-scored={scored}", Case(args, close, rows=real)
    for window, scored in ((None, 300), (29, 40)):
        query, key, value, positions, valid, first_column, query_valid = prefill_case(
            2, queries=300, cached=150, per_head=True
        )
        args = (query, key, value, positions, valid, first_column, window, 0.3, scored, query_valid)
        real = query_valid[:, None, :, None].expand_as(query)
        yield f"long-window={window}-scored={scored}", Case(args, close, rows=real)
        if window is not None:  # the largest probability instead of the sum
            peak = Case(args, close, rows=real, keywords={"peak": True})
            yield f"long-window={window}-scored={scored}-peak", peak
    query, key, value, positions, valid, first_column, query_valid = prefill_case(
        1, queries=300, cached=200, dim=64
    )
    query, key, value = (tensor.bfloat16() for tensor in (query, key, value))
    args = (query, key, value, positions, valid, first_column, None, 0.125, 300, query_valid)
    real = query_valid[:, None, :, None].expand_as(query)
    yield "bf16", Case(args, dict(atol=5e-2, rtol=2e-2), gpu=True, rows=real)
    for kv_heads, group in ((2, 1), (1, 4)):  # a fresh prompt: cuDNN's forward, then the mass
        query, key, value = plainly_causal_case(kv_heads, group)
        positions = torch.arange(300).view(1, 1, 300)
        valid = torch.ones(1, 1, 300, dtype=torch.bool)
        args = (query, key, value, positions, valid, 0, None, 128**-0.5, 300, valid[:, 0])
        close = dict(atol=5e-2, rtol=2e-2)
        yield (
            f"bf16-plainly-causal-group={group}",
            Case(args, close, gpu=True, keywords={"plainly_causal": True}),
        )


def plainly_causal_case(kv_heads: int, group: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(group)
    shapes = ((1, kv_heads * group, 300, 128), (1, kv_heads, 300, 128), (1, kv_heads, 300, 128))
    return tuple(torch.randn(shape, generator=generator).bfloat16() for shape in shapes)


def decode_cases():
    """Slots in no order, some empty, more slots than one program's chunk. The ways of scoring
    take turns over the shapes, so every setting meets every way of scoring (the interpreter makes
    each case cost seconds)."""
    shapes = [(g, h, w) for g in (1, 3, 4) for h in (False, True) for w in (None, 300)]  # 3: padded group
    for index, (group, per_head, window) in enumerate(shapes):
        generator = torch.Generator().manual_seed(group)
        batch, kv_heads, slots_, dim = 3, 2, decode.DECODE_CHUNK * 2 + 77, 32
        heads = kv_heads if per_head else 1
        column = 5000
        query = torch.randn(batch, kv_heads * group, 1, dim, generator=generator)
        key = torch.randn(batch, kv_heads, slots_, dim, generator=generator)
        value = torch.randn(batch, kv_heads, slots_, dim, generator=generator)
        rows = [torch.randperm(column, generator=generator)[:slots_] for _ in range(batch * heads)]
        positions = torch.stack(rows).view(batch, heads, slots_)
        positions[:, :, 17] = column  # the query's own token
        valid = torch.rand(batch, heads, slots_, generator=generator) > 0.3
        valid[:, :, 17] = True
        cached = (query, key, value, positions, valid, torch.tensor([column]), window, 0.2)
        running = torch.rand(batch, kv_heads, slots_, generator=generator)
        name = f"group={group}-per_head={per_head}-window={window}"
        close = dict(atol=2e-5, rtol=1e-4)
        scoring = [("mass", (True,)), ("unscored", (False,)), ("added", (True, running))]
        way, extra = scoring[index % len(scoring)]
        yield f"{name}-{way}", Case((*cached, *extra), close)
    generator = torch.Generator().manual_seed(5)
    query = torch.randn(4, 8, 1, 128, generator=generator).bfloat16()
    key = torch.randn(4, 8, 1500, 128, generator=generator).bfloat16()
    value = torch.randn(4, 8, 1500, 128, generator=generator).bfloat16()
    positions = torch.arange(1500).expand(4, 1, -1).contiguous()
    valid = torch.ones(4, 1, 1500, dtype=torch.bool)
    valid[0, :, :600] = False
    args = (query, key, value, positions, valid, torch.tensor([1499]), None, 128**-0.5, True)
    yield "bf16", Case(args, dict(atol=2e-2, rtol=2e-2), gpu=True)


def eviction_cases():
    """Ties in priority (oldest goes), always-kept tokens, rows under and over budget, empty slots,
    and each sequence's newest tokens kept."""
    for heads in (1, 4):
        for keeps_newest in (False, True):
            generator = torch.Generator().manual_seed(heads)
            batch, slots_ = 5, eviction.EVICT_BLOCK + 300
            priority = torch.randint(0, 40, (batch, heads, slots_), generator=generator).float()
            priority[priority > 35] = torch.inf
            priority[4] = (
                torch.inf
            )  # a row that keeps everything still loses its oldest token when over budget
            positions = torch.stack(
                [torch.randperm(10 * slots_, generator=generator)[:slots_] for _ in range(batch * heads)]
            ).view(batch, heads, slots_)
            valid = torch.rand(batch, heads, slots_, generator=generator) > 0.2
            held = valid.sum(-1).amin(-1)
            budget = torch.stack([held[0] - 1, held[1], held[2] + 5, held[3] - 1, held[4] - 1])
            free = torch.zeros(batch, heads, dtype=torch.long)
            newest = (torch.tensor([10 * slots_ - 1]), torch.tensor([0, 3 * slots_, 50, 9 * slots_, 7]))
            before = valid.sum(-1).to(DEVICE)

            def evicted(args, before=before):
                assert (args[1].sum(-1) < before).any()

            args = (priority, valid, positions, budget, free, *(newest if keeps_newest else (None, None)))
            yield f"heads={heads}-keeps_newest={keeps_newest}", Case(args, check=evicted)


def slot_cases():
    for heads in (1, 3):
        generator = torch.Generator().manual_seed(heads)
        batch, kv_heads, slots_, dim = 2, 3, 11, 16
        new = torch.randn(batch, 1, kv_heads, 2 * dim, generator=generator).transpose(1, 2)  # strided views
        buffers = (
            torch.randn(batch, kv_heads, slots_, dim, generator=generator),
            torch.randn(batch, kv_heads, slots_, dim, generator=generator),
            torch.randint(0, 30, (batch, heads, slots_), generator=generator),
            torch.rand(batch, heads, slots_, generator=generator) > 0.5,
            torch.rand(batch, heads, slots_, generator=generator),
        )
        free = torch.randint(0, slots_, (batch, heads), generator=generator)
        column = torch.tensor([40])

        def one_per_row(args, rows=batch * heads):
            assert (args[4] == 40).sum() == rows  # one position written per bookkeeping row

        def args(new=new, dim=dim, rest=(*buffers, free, column)):
            new = new.to(DEVICE)
            return [new[..., :dim], new[..., dim:], *(on_device(tensor) for tensor in rest)]

        yield f"heads={heads}", Case(args, check=one_per_row)


def gather_cases():
    """Layers' strided keys (as a model's projections leave them) at slots chosen per head or shared
    by the heads, several layers' choices as views of one stacked tensor, a head size that is not a
    power of two, and one layer laid out differently (a launch of its own)."""
    for dim, selection_heads, dtype in ((40, 1, torch.float32), (64, 3, torch.bfloat16)):
        generator = torch.Generator().manual_seed(dim)
        layers, batch, heads, slots_, kept = 4, 2, 3, 100, 70
        states = torch.randn(layers, batch, slots_, heads, dim, generator=generator).to(dtype)
        ranked = torch.rand(layers * batch, selection_heads, slots_, generator=generator)
        chosen = torch.sort(ranked.argsort(-1)[..., :kept]).values

        def args(states=states, chosen=chosen, batch=batch):
            layer_states = [part.transpose(1, 2) for part in states.to(DEVICE)]
            layer_states[-1] = layer_states[-1].contiguous()
            return [layer_states, list(chosen.to(DEVICE).split(batch))]

        yield f"dim={dim}-selection_heads={selection_heads}-{dtype}", Case(args)


def cosine_cases():
    for dtype in (torch.float32, torch.bfloat16):
        generator = torch.Generator().manual_seed(3)
        residual = torch.randn(2, 37, 1500, generator=generator).to(dtype)
        attention = (0.3 * torch.randn(2, 37, 1500, generator=generator)).to(dtype)
        attention[1, 4] = -residual[1, 4]  # residual + attention is zero: the norm's eps decides
        yield str(dtype), Case((residual, attention), dict(atol=1e-6, rtol=1e-5))


PAIRS = {
    "prefill_attention": (prefill.prefill_attention_triton, prefill.prefill_attention_torch, prefill_cases),
    "decode_attention": (decode.decode_attention_triton, decode.decode_attention_torch, decode_cases),
    "evict_lowest": (eviction.evict_lowest_triton, eviction.evict_lowest_torch, eviction_cases),
    "write_slot": (slots.write_slot_triton, slots.write_slot_torch, slot_cases),
    "gather_slots": (gather.gather_slots_triton, gather.gather_slots_torch, gather_cases),
    "residual_cosine": (cosine.residual_cosine_triton, cosine.residual_cosine_torch, cosine_cases),
}
PARAMS = [
    pytest.param(name, case, id=f"{name}-{case_id}")
    for name, (_, _, cases) in PAIRS.items()
    for case_id, case in cases()
]


def on_device(value):
    return value.clone().to(DEVICE) if isinstance(value, torch.Tensor) else value


def flat(result) -> list:
    """A result or argument list with the tensors of nested lists and tuples laid out in order."""
    if not isinstance(result, tuple | list):
        return [result]
    return [leaf for part in result for leaf in flat(part)]


@pytest.mark.skipif(common.triton is None, reason="needs Triton")
@pytest.mark.parametrize(("name", "case"), PARAMS)
def test_triton_kernel_matches_its_torch_twin(name, case):
    if case.gpu and not GPU:
        pytest.skip("needs a CUDA device")
    triton_side, torch_side, _ = PAIRS[name]
    build = case.args if callable(case.args) else lambda: [on_device(a) for a in case.args]
    expected_args, actual_args = build(), build()
    expected = flat(torch_side(*expected_args, **case.keywords))
    actual = flat(triton_side(*actual_args, **case.keywords))
    if case.rows is not None:
        rows = case.rows.to(DEVICE)
        expected[0], actual[0] = expected[0][rows], actual[0][rows]
    for want, got in zip(expected + flat(expected_args), actual + flat(actual_args), strict=True):
        if not isinstance(want, torch.Tensor):
            assert got is want or (want is not None and got == want)
        elif case.tolerance:
            torch.testing.assert_close(got.float(), want.float(), **case.tolerance)
        else:
            assert torch.equal(got, want)
    if case.check is not None:
        case.check(expected_args)


def test_the_dispatch_rule_is_a_gpu_tensor_with_triton_installed():
    assert not common.use_triton(torch.zeros(1))
    if GPU:
        assert common.use_triton(torch.zeros(1, device="cuda")) == (common.triton is not None)


@pytest.mark.skipif(not GPU or common.triton is None, reason="needs a CUDA device and Triton")
@pytest.mark.parametrize("group", [1, 4])
def test_a_plainly_causal_prefill_takes_cudnns_forward_with_the_same_result(group):
    query, key, value = (tensor.cuda() for tensor in plainly_causal_case(2, group))
    assert prefill.cudnn_causal(query, key, value, 128**-0.5) is not None
    positions = torch.arange(300, device="cuda").view(1, 1, 300)
    valid = torch.ones(1, 1, 300, dtype=torch.bool, device="cuda")
    args = (query, key, value, positions, valid, 0, None, 128**-0.5, 300, valid[:, 0])
    ours = prefill.prefill_attention_triton(*args)
    cudnn = prefill.prefill_attention_triton(*args, plainly_causal=True)
    torch.testing.assert_close(cudnn[0], ours[0], atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(cudnn[1], ours[1], atol=1e-3, rtol=1e-3)


def test_prefill_tiles_shrink_to_fit_shared_memory():
    bf16_128 = prefill.fitting(prefill.ROW_CONFIGS, True, 128, 2)
    assert (bf16_128["BM"], bf16_128["BN"]) == prefill.ROW_CONFIGS[0][:2]
    for configs, rows_resident in ((prefill.ROW_CONFIGS, True), (prefill.MASS_CONFIGS, False)):
        for dim, size in ((128, 4), (256, 2), (256, 4)):
            tiles = prefill.fitting(configs, rows_resident, dim, size)
            resident, streamed = (
                (tiles["BM"], 2 * tiles["BN"]) if rows_resident else (tiles["BN"], tiles["BM"])
            )
            assert dim * size * (resident + tiles["num_stages"] * streamed) <= prefill.SHARED_BYTES
    with pytest.raises(ValueError, match="4096 elements of 4 bytes"):
        prefill.fitting(prefill.ROW_CONFIGS, True, 4096, 4)
