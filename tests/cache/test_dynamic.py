import pytest
import torch

import squeezekv
from squeezekv import SqueezeConfig
from squeezekv.cache import dynamic as cache_module

from models import MQA, left_pad, prompts, short_policy, tiny_model


def compressed_forward(model, ids, config, mask=None):
    """Prefill ``ids`` under ``config``; returns the session (its cache stays readable)."""
    with squeezekv.compress(model, config) as session:
        model(ids, attention_mask=mask)
    return session


@pytest.mark.parametrize("family", ["llama", "falcon", "opt", "qwen3"])
@pytest.mark.parametrize("policy", sorted(squeezekv.POLICIES))
def test_layers_hold_their_budget_after_prefill_and_never_more(family, policy):
    model = tiny_model(family)
    ids, mask = left_pad(prompts([40, 29]))
    config = SqueezeConfig(budget=0.3, policy=short_policy(policy), allocator="squeeze")
    with squeezekv.compress(model, config) as session:
        output = model(ids, attention_mask=mask)
        cache = session.cache
        prompt = mask.sum(-1, keepdim=True)
        assert torch.equal(cache.held_tokens(), torch.minimum(cache.budgets, prompt))
        assert (cache.budgets.sum(-1) == 6 * (prompt.squeeze(-1) * 3 // 10)).all()
        for _ in range(6):
            token = output.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(token)], dim=-1)
            output = model(token, attention_mask=mask, cache=output.cache)
            assert (cache.held_tokens() <= cache.budgets).all()
            for layer, budget in zip(cache.layers, cache.budgets.T, strict=True):
                assert layer.keys.shape[2] == int(budget.max())  # physically no larger than the budget


@pytest.mark.parametrize("family", ["llama", "falcon", "gpt_neox"])  # GQA, MQA, MHA
def test_kv_bytes_kept_is_what_the_tensors_hold(family):
    model = tiny_model(family)
    session = compressed_forward(model, prompts([50])[0][None], SqueezeConfig(budget=0.2, policy="h2o"))
    cache = session.cache
    held = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert cache.kv_bytes_kept() == held
    config = model.config
    kv_heads = 1 if family in MQA else getattr(config, "num_key_value_heads", config.num_attention_heads)
    head_dim = config.hidden_size // config.num_attention_heads
    assert cache.kv_bytes_full() == 2 * 6 * kv_heads * 50 * head_dim * 8  # float64, 6 layers
    assert all(layer.keys.shape[1] == kv_heads for layer in cache.layers)


def crop_to(reference, held, compressed):
    """Cuts a plain cache down to exactly the tokens each compressed layer holds, per head.

    ``held[l]`` (``[1, heads, slots]``) are the positions plain layer ``l`` holds; returns the new ones.
    """
    cropped = []
    for plain, layer, positions in zip(reference.layers, compressed.layers, held, strict=True):
        heads = plain.keys.shape[1]
        target = layer.positions.expand(-1, heads, -1).contiguous()
        slots = torch.searchsorted(positions.expand(-1, heads, -1).contiguous(), target)
        index = slots.unsqueeze(-1).expand(-1, -1, -1, plain.keys.shape[-1])
        plain.keys, plain.values = plain.keys.gather(2, index), plain.values.gather(2, index)
        cropped.append(target)
    return cropped


@pytest.mark.parametrize(
    ("policy", "allocator", "steps"),
    [
        ("streaming", "uniform", 1),
        ("streaming", "uniform", 5),
        ("window", "uniform", 1),
        ("h2o", "squeeze", 1),  # layers and heads keep different tokens
        ("h2o", "squeeze", 5),
        ("snapkv", "pyramid", 5),
    ],
)
def test_compressed_cache_continues_like_a_model_run_on_the_kept_tokens(policy, allocator, steps):
    """Continuing the compressed cache gives the logits of a plain model whose cache holds exactly
    the kept tokens' keys and values, with new tokens at their true positions. ``steps`` splits
    the 5 new tokens into that many forwards; the compressed cache evicts after each."""
    model = tiny_model("llama")
    ids = prompts([40])[0][None]
    follow = prompts([5], seed=3)[0][None]
    config = SqueezeConfig(
        budget=12, policy={"snapkv": "snapkv:window=4"}.get(policy, policy), allocator=allocator
    )
    reference = model(ids).cache
    with squeezekv.compress(model, config):
        compressed = model(ids).cache
    if policy == "streaming":
        assert compressed.layers[0].positions[0, 0].tolist() == list(range(4)) + list(range(32, 40))
    held = [torch.arange(40).view(1, 1, -1)] * len(reference.layers)
    compressed_logits, reference_logits = [], []
    for chunk in follow.chunk(steps, dim=1):
        held = crop_to(reference, held, compressed)
        new = torch.arange(compressed.get_seq_length(), compressed.get_seq_length() + chunk.shape[1])
        with squeezekv.compress(model, config):
            compressed_logits.append(model(chunk, cache=compressed).logits)
        for i in range(chunk.shape[1]):  # a plain cache with ragged layers takes one token at a time
            step = slice(i, i + 1)
            reference_logits.append(
                model(chunk[:, step], cache=reference, position_ids=new[None, step]).logits
            )
        held = [torch.cat([h, new.view(1, 1, -1).expand(1, h.shape[1], -1)], dim=-1) for h in held]
    torch.testing.assert_close(torch.cat(compressed_logits, 1), torch.cat(reference_logits, 1))


def test_multi_token_continuation_on_a_padded_compressed_batch():
    """A question appended after compressed documents of different lengths, in one forward."""
    model = tiny_model("mistral")
    documents = prompts([38, 26], seed=4)
    question = prompts([6], seed=5)[0]
    config = SqueezeConfig(budget=0.5, policy="h2o", allocator="squeeze")
    ids, mask = left_pad(documents)
    with squeezekv.compress(model, config):
        cache = model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).cache
        batch_mask = torch.cat([mask, torch.ones(2, 6, dtype=torch.long)], dim=1)
        positions = mask.sum(-1, keepdim=True) + torch.arange(6)
        batched = model(
            question.expand(2, -1), attention_mask=batch_mask, cache=cache, position_ids=positions
        ).logits
    for row, document in enumerate(documents):
        with squeezekv.compress(model, config):
            cache = model(document[None]).cache
            alone = model(question[None], cache=cache).logits
        torch.testing.assert_close(alone[0], batched[row])


@pytest.mark.parametrize("policy", ["window", "streaming"])
@pytest.mark.parametrize("allocator", ["uniform", "squeeze"])
def test_layers_sharing_one_selection_keep_what_each_would_keep_alone(policy, allocator, monkeypatch):
    """Position-ranked policies plan once per budget group at prefill; ranking every layer on its
    own (as score-ranked policies do) must keep the very same slots."""
    selections, real_select = [], cache_module.select

    def counting_select(*args):
        selections.append(args)
        return real_select(*args)

    monkeypatch.setattr(cache_module, "select", counting_select)
    model = tiny_model("llama")
    ids, mask = left_pad(prompts([40, 29]))
    config = SqueezeConfig(budget=0.3, policy=short_policy(policy), allocator=allocator)
    shared = compressed_forward(model, ids, config, mask).cache
    groups = len({tuple(budget.tolist()) for budget in shared.budgets.T})
    ranked = len(selections)  # groups' leaders ranked alone, or as rows of a batch ranked together
    assert sum(args[0].shape[0] for args in selections) == groups * ids.shape[0]
    assert groups < len(shared.layers)
    monkeypatch.setattr(squeezekv.POLICIES[policy], "ranks_by_position", False)
    alone = compressed_forward(model, ids, config, mask).cache
    assert sum(args[0].shape[0] for args in selections[ranked:]) == len(alone.layers) * ids.shape[0]
    for a, b in zip(shared.layers, alone.layers, strict=True):
        for name in ("positions", "valid", "keys", "values"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.parametrize("policy", ["h2o", "snapkv", "streaming"])
@pytest.mark.parametrize("allocator", ["uniform", "squeeze"])
def test_layers_ranked_together_keep_what_each_keeps_ranked_alone(policy, allocator, monkeypatch):
    """Layers that rank their own tokens are ranked as one batch's rows, up to JOINT_PRIORITIES
    priorities at a time; one layer at a time must keep the very same slots."""
    model = tiny_model("llama")
    ids, mask = left_pad(prompts([40, 29]))
    config = SqueezeConfig(budget=0.3, policy=short_policy(policy), allocator=allocator)
    monkeypatch.setattr(squeezekv.POLICIES[policy], "ranks_by_position", False)
    ranked_rows, real_ranking = [], cache_module.ranked_selection

    def counting_ranking(view, *args):
        ranked_rows.append(view.valid.shape[0])
        return real_ranking(view, *args)

    monkeypatch.setattr(cache_module, "ranked_selection", counting_ranking)
    together = compressed_forward(model, ids, config, mask).cache
    assert max(ranked_rows) > ids.shape[0]  # some layers were ranked as one batch
    monkeypatch.setattr(cache_module, "JOINT_PRIORITIES", 1)
    ranked_rows.clear()
    alone = compressed_forward(model, ids, config, mask).cache
    assert max(ranked_rows) == ids.shape[0]
    for a, b in zip(together.layers, alone.layers, strict=True):
        for name in ("positions", "valid", "scores", "keys", "values"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
