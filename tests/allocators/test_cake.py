import functools

import pytest
import torch

import squeezekv
from squeezekv import SqueezeConfig
from squeezekv.allocators import resolve_allocator
from squeezekv.allocators.cake import Cake
from squeezekv.cache.dynamic import score_dispersion
from squeezekv.engine import FastGenerator
from squeezekv.loading import load_model
from squeezekv.reference import load_heldout

CAPS = torch.full((3,), 1000)


@functools.cache
def reference():
    """The bundled reference model, its tokenizer and a held-out prompt (CPU, float32)."""
    tokenizer, model = load_model(None, "cpu", "float32")
    text = load_heldout("short")[0]["text"][:1200]
    return model, tokenizer(text, return_tensors="pt").input_ids


def test_dispersion_is_the_effective_fraction_of_valid_tokens_attended():
    valid = torch.tensor([[[True] * 8 + [False] * 2]])
    even = torch.tensor([[[1.0] * 8 + [5.0] * 2]])  # the invalid slots' scores do not count
    one_hot = torch.tensor([[[0.0, 3.0] + [0.0] * 8]])
    two_heads = torch.cat([even, one_hot], dim=1)  # heads are averaged; validity broadcasts over them
    assert score_dispersion(even, valid).item() == pytest.approx(1.0)
    assert score_dispersion(one_hot, valid).item() == pytest.approx(1 / 8)
    assert score_dispersion(two_heads, valid).item() == pytest.approx((1.0 + 1 / 8) / 2)
    assert score_dispersion(torch.zeros(1, 1, 10), valid).item() == 0.0


def test_a_layer_attending_widely_gets_more_than_one_attending_one_token_at_the_same_total():
    tokens = 64
    layers = [
        torch.ones(tokens),
        torch.eye(tokens)[0],
        torch.rand(tokens, generator=torch.Generator().manual_seed(0)),
    ]
    valid = torch.ones(1, 1, tokens, dtype=torch.bool)
    dispersion = torch.cat([score_dispersion(scores.view(1, 1, -1), valid) for scores in layers])
    budgets = Cake().allocate(dispersion, 40, floor=1, caps=CAPS)
    assert int(budgets.sum()) == 3 * 40
    assert budgets[0] > budgets[2] > budgets[1]
    assert torch.equal(Cake(share=0.0).allocate(dispersion, 40, floor=1, caps=CAPS), torch.full((3,), 40))
    sharper, flatter = (Cake(temperature=t).allocate(dispersion, 40, 1, CAPS) for t in (0.5, 2.0))
    assert sharper[0] > budgets[0] > flatter[0] and int(sharper.sum()) == int(flatter.sum()) == 120
    half = Cake(share=0.5).allocate(dispersion, 40, floor=1, caps=CAPS)
    assert int(half.min()) >= 20 and int(half.sum()) == 120


def test_scores_holding_nothing_are_refused():
    with pytest.raises(ValueError, match="allocator 'cake'.*needs a policy that scores tokens"):
        Cake().allocate(torch.zeros(3, dtype=torch.float64), 40, floor=1, caps=CAPS)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("cake:temperature=0", r"allocator 'cake': temperature=0.0 must be > 0"),
        ("cake:temperature=-1", r"temperature=-1.0 must be > 0"),
        ("cake:share=1.5", r"allocator 'cake': share=1.5 must be in \[0, 1\]"),
        ("cake:share=-0.1", r"share=-0.1 must be in \[0, 1\]"),
    ],
)
def test_bad_settings_are_refused_with_the_setting_named(spec, message):
    with pytest.raises(ValueError, match=message):
        resolve_allocator(spec)


def test_spec_strings_resolve_through_the_registry():
    assert resolve_allocator("cake:share=0.5,temperature=2") == Cake(temperature=2.0, share=0.5)
    assert SqueezeConfig(0.3, "snapkv", "cake:share=0.5").allocator == Cake(share=0.5)


@pytest.mark.parametrize("policy", ["window", "streaming"])
def test_a_policy_that_scores_nothing_is_refused_naming_both(policy):
    with pytest.raises(ValueError, match=rf"allocator 'cake'.*policy '{policy}' scores nothing"):
        SqueezeConfig(budget=0.3, policy=policy, allocator="cake")


def test_planning_without_the_prefill_dispersion_is_refused():
    config = SqueezeConfig(budget=0.5, policy="h2o", allocator="cake")
    with pytest.raises(ValueError, match="pass dispersion to plan_budgets"):
        config.plan_budgets(torch.rand(1, 3), torch.tensor([100]), [None] * 3)


@pytest.mark.parametrize("policy", ["h2o", "snapkv"])
def test_on_the_reference_model_cake_moves_budget_across_layers_at_uniforms_memory(policy):
    model, ids = reference()
    layers = model.config.num_hidden_layers
    results = {
        allocator: squeezekv.generate(
            model, ids, SqueezeConfig(0.3, policy, allocator), max_new_tokens=4, do_sample=False
        )
        for allocator in ("uniform", "cake")
    }
    budgets = results["cake"].stats.layer_budget[0]
    mean = int(results["uniform"].stats.layer_budget[0, 0])
    assert len(set(budgets.tolist())) > layers // 2 and int(budgets.sum()) == layers * mean
    assert results["cake"].stats.kv_bytes_kept == results["uniform"].stats.kv_bytes_kept


def test_each_sequence_of_a_batch_is_planned_on_its_own_scores():
    model, ids = reference()
    short = ids[:, :150]
    mask = torch.ones(2, ids.shape[1], dtype=torch.long)
    mask[1, : ids.shape[1] - 150] = 0
    batch = torch.cat([ids, torch.cat([torch.zeros_like(ids[:, :-150]), short], 1)])
    config = SqueezeConfig(0.3, "h2o", "cake")
    batched = squeezekv.generate(model, batch, config, attention_mask=mask, max_new_tokens=1, do_sample=False)
    alone = squeezekv.generate(model, short, config, max_new_tokens=1, do_sample=False)
    assert torch.equal(batched.stats.layer_budget[1], alone.stats.layer_budget[0])


def test_a_keep_everything_budget_is_model_generate():
    model, ids = reference()
    expected = model.generate(ids, max_new_tokens=6, do_sample=False)
    result = squeezekv.generate(
        model, ids, SqueezeConfig(1.0, "h2o", "cake"), max_new_tokens=6, do_sample=False
    )
    assert torch.equal(result.sequences, expected)
    assert result.stats.kv_bytes_kept == result.stats.kv_bytes_full


def test_the_fast_engine_plans_the_same_budgets_through_its_prefill():
    model, ids = reference()
    config = SqueezeConfig(0.3, "h2o", "cake")
    generator = FastGenerator(model, config, cuda_graphs=False, compile_layers=False)
    fast = generator.generate(ids, torch.ones_like(ids), 4)
    simple = squeezekv.generate(model, ids, config, max_new_tokens=4, do_sample=False)
    assert torch.equal(fast.stats.layer_budget, simple.stats.layer_budget)
    assert torch.equal(fast.sequences, simple.sequences)
