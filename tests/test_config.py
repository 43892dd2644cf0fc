import pytest

from squeezekv import SqueezeConfig


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"budget": 0}, "must be >= 1"),
        ({"budget": -3}, "must be >= 1"),
        ({"budget": 0.0}, r"\(0, 1\]"),
        ({"budget": -0.5}, r"\(0, 1\]"),
        ({"budget": 1.5}, r"\(0, 1\]"),
        ({"budget": "0.2"}, "budget must be"),
        ({"budget": True}, "budget must be"),
        ({"budget": 0.2, "p": 0.0}, "p 0.0"),
        ({"budget": 0.2, "p": 1.2}, "p 1.2"),
        ({"budget": 0.2, "groups": 1}, "groups 1"),
        ({"budget": 0.2, "policy": "lru"}, "unknown policy 'lru'"),
        ({"budget": 0.2, "allocator": "random"}, "unknown allocator 'random'"),
        ({"budget": 4, "policy": "streaming", "sinks": 4}, "sinks=4"),
        ({"budget": 0.2, "recent_ratio": 1.5}, "recent_ratio"),
        ({"budget": 0.2, "snapkv_kernel": 4}, "snapkv_kernel"),
    ],
)
def test_bad_config_is_rejected_with_the_value_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SqueezeConfig(**kwargs)


def test_fraction_budget_too_small_for_sinks_is_rejected_at_planning_time():
    config = SqueezeConfig(budget=0.1, policy="streaming", sinks=4)
    assert config.tokens_per_layer(100) == 10
    with pytest.raises(ValueError, match="needs at least 5"):
        config.tokens_per_layer(40)


def test_groups_larger_than_the_model_is_rejected():
    with pytest.raises(ValueError, match="groups 8 exceeds the model's 6 layers"):
        SqueezeConfig(budget=0.2, groups=8).check_layers(6)


def test_int_and_float_budgets_mean_tokens_and_fractions():
    assert SqueezeConfig(budget=1.0).tokens_per_layer(37) == 37
    assert SqueezeConfig(budget=64).tokens_per_layer(37) == 64
    assert SqueezeConfig(budget=0.25).tokens_per_layer(100) == 25
