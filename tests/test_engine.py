"""The fast engine must keep exactly what the simple path keeps and produce the same tokens."""

import pytest
import torch

import squeezekv
from models import left_pad, prompts, tiny_model
from squeezekv import SqueezeConfig
from squeezekv.engine import FastGenerator

NEW_TOKENS = 12


def kept_positions(layer, row, head):
    return sorted(
        layer.positions[row, min(head, layer.positions.shape[1] - 1)][
            layer.valid[row, min(head, layer.valid.shape[1] - 1)]
        ].tolist()
    )


@pytest.mark.parametrize("family", ["llama", "mistral", "falcon", "gemma3", "gpt_neox", "opt"])
@pytest.mark.parametrize("policy", sorted(squeezekv.POLICIES))
def test_fast_engine_equals_simple_path(family, policy):
    model = tiny_model(family)
    ids, mask = left_pad(prompts([40, 25, 33], seed=1))
    config = SqueezeConfig(budget=0.3, policy=policy, allocator="squeeze", sinks=2, snapkv_window=4)
    with squeezekv.compress(model, config, max_new_tokens=NEW_TOKENS) as session:
        simple = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
        simple_cache = session.cache
    generator = FastGenerator(model, config)
    fast = generator.generate(ids, mask, max_new_tokens=NEW_TOKENS, prefill_batch=2)
    assert torch.equal(simple, fast.sequences)
    for dynamic, static in zip(simple_cache.layers, generator.cache.layers, strict=True):
        heads = static.keys.shape[1]
        for row in range(3):
            for head in range(heads):
                assert kept_positions(dynamic, row, head) == kept_positions(static, row, head)
        assert static.keys.shape[2] == int(static.budget.max()) + 1  # the budget plus one free slot
    assert fast.stats.kv_bytes_kept == generator.cache.kv_bytes_kept() < fast.stats.kv_bytes_full


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])
def test_fast_engine_at_a_keep_everything_budget_matches_model_generate(family):
    model = tiny_model(family)
    ids, mask = left_pad(prompts([30, 22], seed=2))
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    for policy in sorted(squeezekv.POLICIES):
        fast = FastGenerator(model, SqueezeConfig(budget=100, policy=policy)).generate(ids, mask, NEW_TOKENS)
        assert torch.equal(fast.sequences, expected), policy


def test_micro_batched_prefill_changes_nothing():
    model = tiny_model("qwen3")
    ids, mask = left_pad(prompts([35, 20, 28, 31], seed=3))
    config = SqueezeConfig(budget=0.25, policy="h2o")
    whole = FastGenerator(model, config).generate(ids, mask, NEW_TOKENS)
    one_by_one = FastGenerator(model, config).generate(ids, mask, NEW_TOKENS, prefill_batch=1)
    assert torch.equal(whole.sequences, one_by_one.sequences)
    assert torch.equal(whole.stats.layer_budget, one_by_one.stats.layer_budget)
