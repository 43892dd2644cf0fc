"""The Triton kernels against the plain path.

The prefill kernels need a GPU. The decode kernels run anywhere Triton is installed: without a GPU,
in Triton's interpreter (``tests/conftest.py`` turns it on).
"""

import pytest
import torch

from squeezekv import kernels
from squeezekv.attention import attend, layer_mask
from squeezekv.engine import evict_lowest, write_slot
from squeezekv.policies import KEEP

needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or kernels.triton is None, reason="needs a CUDA device and Triton"
)
needs_triton = pytest.mark.skipif(kernels.triton is None, reason="needs Triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def case(seed, batch=2, kv_heads=2, group=2, cached=37, queries=70, dim=16, per_head=False):
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
    tensors = (query, key, value, positions.contiguous(), valid)
    return *(tensor.cuda() for tensor in tensors), first_column, query_valid.cuda()


@needs_gpu
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("window", [None, 29])
@pytest.mark.parametrize("scored", [70, 9])
def test_kernels_match_the_plain_path(per_head, window, scored):
    query, key, value, positions, valid, first_column, query_valid = case(0, per_head=per_head)
    queries = query.shape[2]
    columns = torch.arange(first_column, first_column + queries, device="cuda")
    mask = layer_mask(positions, valid, columns, window)
    expected, expected_mass = attend(query, key, value, mask, 0.3, scored, query_valid)
    weight = torch.zeros(2, queries, device="cuda")
    weight[:, queries - scored :] = 1.0
    weight *= query_valid
    output, mass = kernels.attend_scored(
        query, key, value, positions, valid, first_column, window, 0.3, weight
    )
    real = query_valid[:, None, :, None].expand_as(output)  # padding queries' outputs are never used
    torch.testing.assert_close(output[real], expected[real], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(mass, expected_mass, atol=2e-5, rtol=1e-4)


@needs_gpu
def test_bf16_kernels_stay_close_to_the_plain_path():
    query, key, value, positions, valid, first_column, query_valid = case(1, queries=300, cached=200, dim=64)
    query, key, value = (tensor.bfloat16() for tensor in (query, key, value))
    columns = torch.arange(first_column, first_column + 300, device="cuda")
    mask = layer_mask(positions, valid, columns, None)
    expected, expected_mass = attend(query, key, value, mask, 0.125, 300, query_valid)
    output, mass = kernels.attend_scored(
        query, key, value, positions, valid, first_column, None, 0.125, query_valid.float()
    )
    real = query_valid[:, None, :, None].expand_as(output)
    torch.testing.assert_close(output[real].float(), expected[real].float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(mass, expected_mass, atol=5e-2, rtol=2e-2)


@needs_triton
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("window", [None, 300])
def test_decode_kernel_matches_the_plain_path(group, per_head, window):
    """Slots in no order, some empty, more slots than one program's chunk."""
    generator = torch.Generator().manual_seed(group)
    batch, kv_heads, slots, dim = 3, 2, kernels.DECODE_CHUNK * 2 + 77, 32
    heads = kv_heads if per_head else 1
    column = 5000
    query = torch.randn(batch, kv_heads * group, 1, dim, generator=generator)
    key = torch.randn(batch, kv_heads, slots, dim, generator=generator)
    value = torch.randn(batch, kv_heads, slots, dim, generator=generator)
    rows = [torch.randperm(column, generator=generator)[:slots] for _ in range(batch * heads)]
    positions = torch.stack(rows).view(batch, heads, slots)
    positions[:, :, 17] = column  # the query's own token
    valid = torch.rand(batch, heads, slots, generator=generator) > 0.3
    valid[:, :, 17] = True
    query, key, value, positions, valid = (t.to(DEVICE) for t in (query, key, value, positions, valid))
    mask = valid if window is None else valid & (positions > column - window)
    expected, expected_mass = attend(query, key, value, mask.unsqueeze(2), 0.2, 1)
    cached = (query, key, value, positions, valid, torch.tensor([column], device=DEVICE), window, 0.2)
    output, mass = kernels.attend_decode(*cached, True)
    torch.testing.assert_close(output, expected, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(mass, expected_mass, atol=2e-5, rtol=1e-4)
    unscored, none = kernels.attend_decode(*cached, False)
    assert none is None
    torch.testing.assert_close(unscored, expected, atol=2e-5, rtol=1e-4)
    running = torch.rand_like(expected_mass)
    folded = running + expected_mass
    _, none = kernels.attend_decode(*cached, True, add_mass_to=running)
    assert none is None
    torch.testing.assert_close(running, folded, atol=2e-5, rtol=1e-4)


@needs_gpu  # Triton's interpreter computes bf16 matrix products wrongly
def test_bf16_decode_kernel_stays_close_to_the_plain_path():
    generator = torch.Generator().manual_seed(5)
    query = torch.randn(4, 8, 1, 128, generator=generator).to(DEVICE).bfloat16()
    key = torch.randn(4, 8, 1500, 128, generator=generator).to(DEVICE).bfloat16()
    value = torch.randn(4, 8, 1500, 128, generator=generator).to(DEVICE).bfloat16()
    positions = torch.arange(1500, device=DEVICE).expand(4, 1, -1).contiguous()
    valid = torch.ones(4, 1, 1500, dtype=torch.bool, device=DEVICE)
    valid[0, :, :600] = False
    expected, expected_mass = attend(query, key, value, valid.unsqueeze(2), 128**-0.5, 1)
    column = torch.tensor([1499], device=DEVICE)
    output, mass = kernels.attend_decode(query, key, value, positions, valid, column, None, 128**-0.5, True)
    torch.testing.assert_close(output.float(), expected.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(mass, expected_mass, atol=2e-2, rtol=2e-2)


@needs_triton
@pytest.mark.parametrize("heads", [1, 4])
@pytest.mark.parametrize("keeps_newest", [False, True])
def test_eviction_kernel_matches_the_plain_path(heads, keeps_newest):
    """Ties in priority (oldest goes), always-kept tokens, rows under and over budget, empty slots,
    and each sequence's newest tokens kept."""
    generator = torch.Generator().manual_seed(heads)
    batch, slots = 5, kernels.EVICT_BLOCK + 300
    priority = torch.randint(0, 40, (batch, heads, slots), generator=generator).float()
    priority[priority > 35] = KEEP
    priority[4] = KEEP  # a row that keeps everything still loses its oldest token when over budget
    positions = torch.stack(
        [torch.randperm(10 * slots, generator=generator)[:slots] for _ in range(batch * heads)]
    )
    positions = positions.view(batch, heads, slots)
    valid = torch.rand(batch, heads, slots, generator=generator) > 0.2
    held = valid.sum(-1).amin(-1)
    budget = torch.stack([held[0] - 1, held[1], held[2] + 5, held[3] - 1, held[4] - 1])
    states = [
        (valid.clone().to(DEVICE), torch.zeros(batch, heads, dtype=torch.long, device=DEVICE)) for _ in "ab"
    ]
    column, newest = torch.tensor([10 * slots - 1]), torch.tensor([0, 3 * slots, 50, 9 * slots, 7])
    arguments = [t.to(DEVICE) for t in (priority, positions, budget, column, newest)]
    if not keeps_newest:
        arguments[3:] = None, None
    for evict, (flags, free) in zip((evict_lowest, kernels.evict_lowest), states, strict=True):
        evict(arguments[0], flags, arguments[1], arguments[2], free, *arguments[3:])
    assert torch.equal(states[0][0], states[1][0]) and torch.equal(states[0][1], states[1][1])
    assert (states[0][0].sum(-1) < valid.to(DEVICE).sum(-1)).any()  # something was evicted


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_cosine_kernel_matches_torch(dtype):
    generator = torch.Generator().manual_seed(3)
    residual = torch.randn(2, 37, 1500, generator=generator).to(DEVICE, dtype)
    attention = (0.3 * torch.randn(2, 37, 1500, generator=generator)).to(DEVICE, dtype)
    attention[1, 4] = -residual[1, 4]  # residual + attention is zero: the norm's eps decides
    expected = torch.nn.functional.cosine_similarity(
        residual.float(), residual.float() + attention.float(), dim=-1
    )
    torch.testing.assert_close(kernels.residual_cosine(residual, attention), expected, atol=1e-6, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("heads", [1, 3])
def test_slot_writing_kernel_matches_the_plain_path(heads):
    generator = torch.Generator().manual_seed(heads)
    batch, kv_heads, slots, dim = 2, 3, 11, 16
    new = torch.randn(batch, 1, kv_heads, 2 * dim, generator=generator).transpose(1, 2)  # strided views
    key, value = new[..., :dim], new[..., dim:]
    free = torch.randint(0, slots, (batch, heads), generator=generator)
    column = torch.tensor([40])
    buffers = [
        torch.randn(batch, kv_heads, slots, dim, generator=generator),
        torch.randn(batch, kv_heads, slots, dim, generator=generator),
        torch.randint(0, 30, (batch, heads, slots), generator=generator),
        torch.rand(batch, heads, slots, generator=generator) > 0.5,
        torch.rand(batch, heads, slots, generator=generator),
    ]
    plain = [buffer.clone().to(DEVICE) for buffer in buffers]
    fused = [buffer.clone().to(DEVICE) for buffer in buffers]
    inputs = [t.to(DEVICE) for t in (key, value)]
    write_slot(*inputs, *plain, free.to(DEVICE), column.to(DEVICE))
    kernels.write_slot(*inputs, *fused, free.to(DEVICE), column.to(DEVICE))
    for expected, actual in zip(plain, fused, strict=True):
        assert torch.equal(expected, actual)
    assert (plain[2] == 40).sum() == batch * heads  # one position written per bookkeeping row
