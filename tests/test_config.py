import numpy as np
import pytest

from squeezekv import SqueezeConfig
from squeezekv.allocators import Squeeze, Uniform
from squeezekv.policies import H2O, SnapKV, Streaming


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
        ({"budget": 0.2, "allocator": "squeeze:p=0.0"}, "p=0.0"),
        ({"budget": 0.2, "allocator": "squeeze:p=1.2"}, "p=1.2"),
        ({"budget": 0.2, "allocator": "squeeze:groups=1"}, "groups=1"),
        ({"budget": 0.2, "policy": "lru"}, "unknown policy 'lru'"),
        ({"budget": 0.2, "allocator": "random"}, "unknown allocator 'random'"),
        ({"budget": 4, "policy": "streaming:sinks=4"}, "sinks=4"),
        ({"budget": 0.2, "policy": "h2o:recent_ratio=1.5"}, "recent_ratio"),
        ({"budget": 0.2, "policy": "snapkv:kernel=4"}, "kernel"),
        ({"budget": 0.2, "policy": "snapkv:window=2.5"}, r"window='2.5' must be an integer"),
        (
            {"budget": 0.2, "policy": "h2o:window=3"},
            r"policy 'h2o' has no setting 'window'; its settings: recent_ratio",
        ),
        ({"budget": 0.2, "policy": "h2o:recent_ratio"}, "is not setting=value"),
        ({"budget": 0.2, "policy": 3}, "policy must be a Policy, a name or"),
        ({"budget": 0.2, "kv_bits": 8, "kv_group": 48}, "kv_group=48 is not supported"),
    ],
)
def test_bad_config_is_rejected_with_the_value_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SqueezeConfig(**kwargs)


def test_names_specs_and_instances_resolve_once_to_instances():
    assert SqueezeConfig(budget=0.2) == SqueezeConfig(0.2, H2O(), Squeeze())
    config = SqueezeConfig(budget=0.2, policy="snapkv:window=64", allocator="squeeze:p=0.5,groups=3")
    assert config.policy == SnapKV(window=64) and config.allocator == Squeeze(p=0.5)
    assert (config.policy.spec, config.allocator.spec) == ("snapkv:window=64", "squeeze:p=0.5")
    assert SqueezeConfig(0.2, policy=config.policy.spec).policy == config.policy  # specs round-trip
    assert SqueezeConfig(0.2, allocator="uniform").allocator.spec == "uniform"


def test_build_routes_each_setting_to_the_part_that_has_it():
    config = SqueezeConfig.build(budget=0.2, policy="h2o", allocator="squeeze", p=0.5, recent_ratio=0.3)
    assert config.policy == H2O(recent_ratio=0.3) and config.allocator == Squeeze(p=0.5)
    with pytest.raises(
        ValueError, match=r"no setting 'p'.*policy 'h2o': \['recent_ratio'\], allocator 'uniform': none"
    ):
        SqueezeConfig.build(budget=0.2, allocator="uniform", p=0.5)
    with pytest.raises(ValueError, match="sinks='3' must be an integer"):
        SqueezeConfig.build(budget=0.2, policy="streaming", sinks="3")


def test_to_dict_names_every_setting():
    assert SqueezeConfig(0.2, Streaming(sinks=2), Uniform()).to_dict() == {
        "budget": 0.2,
        "policy": {"name": "streaming", "sinks": 2},
        "allocator": {"name": "uniform"},
    }


def test_numpy_budgets_are_their_python_values():
    assert SqueezeConfig(np.int64(64)).budget == 64 and type(SqueezeConfig(np.int64(64)).budget) is int
    assert SqueezeConfig(np.float64(0.25)).tokens_per_layer(100) == 25
    assert SqueezeConfig(np.float32(1.0)).keeps_everything
    with pytest.raises(ValueError, match="budget must be"):
        SqueezeConfig(np.bool_(True))


def test_fraction_budget_too_small_for_sinks_is_rejected_at_planning_time():
    config = SqueezeConfig(budget=0.1, policy="streaming:sinks=4")
    assert config.tokens_per_layer(100) == 10
    with pytest.raises(
        ValueError, match=r"too small for policy 'streaming' \(sinks=4\), which needs at least 5"
    ):
        config.tokens_per_layer(40)


def test_int_and_float_budgets_mean_tokens_and_fractions_and_one_keeps_everything():
    assert SqueezeConfig(budget=0.5).tokens_per_layer(37) == 18
    assert SqueezeConfig(budget=64).tokens_per_layer(37, 10) == 64
    assert SqueezeConfig(budget=0.25).tokens_per_layer(100, 10) == 25
    keep_all = SqueezeConfig(budget=1.0, policy="streaming")
    assert keep_all.keeps_everything and not SqueezeConfig(budget=1).keeps_everything
    assert keep_all.tokens_per_layer(3, 10) == 13  # prompt and new tokens, below streaming's floor too
