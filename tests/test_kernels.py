"""The Triton kernels against the plain path (on a GPU; skipped without one)."""

import pytest
import torch

from squeezekv import kernels
from squeezekv.attention import attend, layer_mask

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or kernels.triton is None, reason="needs a CUDA device and Triton"
)


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
