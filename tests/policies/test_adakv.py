"""Ada-KV: its settings, how it spreads a layer's budget over heads, and on the reference model."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import squeezekv
from squeezekv import SqueezeConfig
from squeezekv.cache.ragged import RaggedLayer
from squeezekv.policies import LayerView, resolve_policy
from squeezekv.policies.adakv import AdaKV
from squeezekv.reference import load_heldout, reference_model_path


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"floor": -0.1}, "floor"),
        ({"floor": 1.5}, "floor"),
        ({"window": -1}, "window"),
        ({"kernel": 4}, "kernel"),
    ],
)
def test_bad_settings_are_refused_by_name(settings, named):
    with pytest.raises(ValueError, match=named):
        AdaKV(**settings)


def test_spec_string_sets_every_setting():
    assert resolve_policy("adakv:floor=0.5,window=8,kernel=3") == AdaKV(window=8, kernel=3, floor=0.5)


def two_heads(scores, budget, prompt=30, window=2):
    """A prefill view of one sequence whose two heads score the prompt's tokens as given."""
    positions = torch.arange(prompt).view(1, 1, prompt)
    view = LayerView(
        positions, torch.ones(1, 1, prompt, dtype=torch.bool), scores, "prefill", prompt, torch.tensor([0])
    )
    return AdaKV(window=window, floor=0.2), view, torch.tensor([budget])


def test_a_spread_head_gets_more_than_a_concentrated_one_within_the_floor():
    concentrated = torch.zeros(30)
    concentrated[[3, 9]] = 10.0
    scores = torch.stack([concentrated, torch.ones(30)]).unsqueeze(0)
    policy, view, budget = two_heads(scores, budget=10)
    # 8 tokens per head beyond the 2-token window, 16 in all; each head keeps at least 0.2 x 8 -> 1:
    # the concentrated head adds its two strong tokens, the spread head the other 14
    assert policy.head_budgets(view, budget).tolist() == [[4, 16]]
    strict = AdaKV(window=2, floor=0.5)  # at least 4 each: the concentrated head is topped up
    assert strict.head_budgets(view, budget).tolist() == [[6, 14]]
    assert AdaKV(window=2, floor=1.0).head_budgets(view, budget) is None  # SnapKV's even split


def test_heads_keep_the_layer_budget_when_everything_fits_or_the_window_fills_it():
    scores = torch.rand(1, 2, 30)
    for budget in (30, 2, 1):
        policy, view, budgets = two_heads(scores, budget=budget)
        assert policy.head_budgets(view, budgets) is None


def reference_session(budget=0.2, policy="adakv:window=16"):
    path = reference_model_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    ids = tokenizer(load_heldout("short")[0]["text"][:1500], return_tensors="pt").input_ids[:, :300]
    config = SqueezeConfig(budget=budget, policy=policy, allocator="squeeze")
    with torch.inference_mode(), squeezekv.compress(model, config) as session:
        model(ids)
    return session.cache, ids.shape[1]


def test_on_the_reference_model_heads_keep_different_numbers_in_packed_storage():
    cache, prompt = reference_session()
    differ = 0
    for layer, budget in zip(cache.layers, cache.budgets[0].tolist(), strict=True):
        assert isinstance(layer, RaggedLayer)
        held = layer.lengths[0]
        assert int(held.sum()) == held.numel() * budget  # the layer's budget, spread over its heads
        assert torch.equal(held, layer.head_budgets[0])
        assert int(held.min()) >= 16 + int(0.2 * (budget - 16))  # the window and the floor
        differ += int(held.max() != held.min())
        heads, dim = held.numel(), layer.keys.shape[-1]
        assert layer.nbytes() == 2 * int(held.sum()) * dim * 4  # float32 keys and values, packed
        assert layer.nbytes() < 2 * heads * int(held.max()) * dim * 4  # what padding to the widest costs
    assert differ >= len(cache.layers) // 2
    assert cache.kv_bytes_kept() == sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert torch.equal(cache.held_tokens(), cache.budgets)  # per head on average
    assert cache.kv_bytes_full() == 2 * 16 * 2 * prompt * 40 * 4
