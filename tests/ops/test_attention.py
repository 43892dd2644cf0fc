import torch

from squeezekv.ops.attention import attend, layer_mask


def naive(query, key, value, allowed, scaling, softcap=None):
    """Per-head loops over an explicit softmax: the definition, written plainly."""
    batch, q_heads, queries, _ = query.shape
    group = q_heads // key.shape[1]
    output = torch.zeros_like(query)
    probabilities = torch.zeros(batch, q_heads, queries, key.shape[2], dtype=query.dtype)
    for b in range(batch):
        for h in range(q_heads):
            logits = query[b, h] @ key[b, h // group].T * scaling
            if softcap is not None:
                logits = torch.tanh(logits / softcap) * softcap
            head_mask = allowed[b, h // group if allowed.shape[1] > 1 else 0]
            probs = torch.softmax(logits.masked_fill(~head_mask, float("-inf")), dim=-1)
            probabilities[b, h] = probs
            output[b, h] = probs @ value[b, h // group]
    return output, probabilities


def random_case(seed, kv_heads=2, group=3, per_head=True):
    generator = torch.Generator().manual_seed(seed)
    batch, queries, keys, dim = 2, 5, 11, 8
    query = torch.randn(batch, kv_heads * group, queries, dim, generator=generator, dtype=torch.float64)
    key = torch.randn(batch, kv_heads, keys, dim, generator=generator, dtype=torch.float64)
    value = torch.randn(batch, kv_heads, keys, dim, generator=generator, dtype=torch.float64)
    heads = kv_heads if per_head else 1
    positions = torch.sort(torch.randperm(30, generator=generator)[: keys - queries]).values
    positions = torch.cat([positions, torch.arange(30, 30 + queries)]).expand(batch, heads, keys).clone()
    valid = torch.rand(batch, heads, keys, generator=generator) > 0.2
    valid[..., -queries:] = True
    return query, key, value, positions, valid, torch.arange(30, 30 + queries)


def test_mask_is_causal_valid_and_windowed():
    positions = torch.tensor([[[0, 3, 5, 6, 7]]])
    valid = torch.tensor([[[True, False, True, True, True]]])
    mask = layer_mask(positions, valid, torch.tensor([6, 7]), sliding_window=3)
    assert mask[0, 0].tolist() == [[False, False, True, True, False], [False, False, True, True, True]]


def test_padding_query_sees_only_itself():
    positions = torch.tensor([[[0, 1, 2]]])
    valid = torch.tensor([[[False, False, True]]])
    mask = layer_mask(positions, valid, torch.tensor([0, 1, 2]), sliding_window=None)
    assert mask[0, 0].tolist() == [[True, False, False], [False, True, False], [False, False, True]]


def test_every_path_matches_the_naive_definition():
    for per_head in (True, False):
        query, key, value, positions, valid, columns = random_case(0, per_head=per_head)
        allowed = layer_mask(positions, valid, columns, sliding_window=None)
        expected, probabilities = naive(query, key, value, allowed, 0.3)
        for explicit in (False, True):
            output, mass = attend(query, key, value, allowed, 0.3, explicit=explicit)
            torch.testing.assert_close(output, expected)
            assert mass is None
        query_valid = torch.tensor([[1, 1, 0, 1, 1], [1, 1, 1, 1, 1]])
        output, mass = attend(query, key, value, allowed, 0.3, scored_queries=3, query_valid=query_valid)
        torch.testing.assert_close(output, expected)
        weights = torch.zeros(2, 5, dtype=torch.float64)
        weights[:, 2:] = query_valid[:, 2:]
        expected_mass = torch.einsum("bhqk,bq->bhk", probabilities, weights).view(2, 2, 3, -1).sum(2)
        torch.testing.assert_close(mass, expected_mass.float())


def test_softcap_and_chunking_match_the_naive_definition(monkeypatch):
    import squeezekv.ops.attention as attention

    monkeypatch.setattr(attention, "SCORE_CHUNK_ELEMENTS", 40)  # forces many query chunks
    query, key, value, positions, valid, columns = random_case(1, kv_heads=1, group=4)
    allowed = layer_mask(positions, valid, columns, sliding_window=None)
    expected, probabilities = naive(query, key, value, allowed, 0.5, softcap=2.0)
    output, mass = attention.attend(query, key, value, allowed, 0.5, scored_queries=5, softcap=2.0)
    torch.testing.assert_close(output, expected)
    torch.testing.assert_close(mass, probabilities.sum((1, 2)).unsqueeze(1).float())


def test_plain_causal_matches_an_explicit_causal_mask():
    _, key, value, *_ = random_case(2, kv_heads=2, group=2)
    query = torch.randn(2, 4, key.shape[2], 8, dtype=torch.float64)  # as many queries as keys
    allowed = layer_mask(
        torch.arange(key.shape[2]).expand(2, 1, -1),
        torch.ones(2, 1, key.shape[2], dtype=torch.bool),
        torch.arange(key.shape[2]),
        sliding_window=None,
    )
    expected, probabilities = naive(query, key, value, allowed, 0.4)
    for scored in (0, 3):
        output, mass = attend(query, key, value, None, 0.4, scored_queries=scored)
        torch.testing.assert_close(output, expected)
        if scored:
            torch.testing.assert_close(mass, probabilities[:, :, -3:].sum(2).view(2, 2, 2, -1).sum(2).float())
