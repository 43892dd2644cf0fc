import json

import pytest
import torch

from squeezekv import SqueezeConfig
from squeezekv.allocators import Squeeze, resolve_allocator
from squeezekv.allocators.oracle import SENSITIVITY_KIND, Oracle, model_identity
from squeezekv.cli.common import setting_flags

from models import tiny_model

# ten layers: 3, 7 and 1 hurt least when squeezed alone; 5 hurts most
DELTA = [0.04, 0.002, 0.03, -0.01, 0.05, 0.09, 0.02, 0.0, 0.06, 0.01]
SIMILARITY = torch.tensor(
    [0.91, 0.92, 0.93, 0.98, 0.985, 0.99, 0.97, 0.975, 0.995, 0.96], dtype=torch.float64
)


def write_profile(path, delta=DELTA, **model):
    identity = {"name": "made-up", "num_hidden_layers": len(delta), **model}
    path.write_text(json.dumps({"kind": SENSITIVITY_KIND, "model": identity, "delta_nll": delta}))
    return str(path)


def test_squeezes_the_least_sensitive_layers_and_keeps_the_total(tmp_path):
    profile = write_profile(tmp_path / "s.json")
    caps = torch.full((10,), 10_000)
    budgets = Oracle(profile=profile, squeezed=3).allocate(SIMILARITY, 300, floor=1, caps=caps)
    assert int(budgets.sum()) == 10 * 300
    assert set(torch.argsort(budgets)[:3].tolist()) == {3, 7, 1}
    assert budgets[[3, 7, 1]].tolist() == [105, 105, 105]  # p * b, p = 0.35
    assert int(budgets.min()) == 105 and len(set(budgets[[0, 2, 4, 5, 6, 8, 9]].tolist())) <= 2


def test_squeezes_as_many_layers_as_squeeze_by_default(tmp_path):
    oracle = Oracle(profile=write_profile(tmp_path / "s.json"))
    count = int(Squeeze().squeezed_layers(SIMILARITY).sum())
    chosen = oracle.squeezed_layers(SIMILARITY)
    assert int(chosen.sum()) == count
    order = sorted(range(10), key=lambda layer: DELTA[layer])
    assert set(chosen.nonzero().flatten().tolist()) == set(order[:count])


def test_a_str_setting_travels_through_spec_strings_and_flags(tmp_path):
    profile = write_profile(tmp_path / "s.json")
    oracle = resolve_allocator(f"oracle:profile={profile},squeezed=2,p=0.5")
    assert (oracle.profile, oracle.squeezed, oracle.p) == (profile, 2, 0.5)
    assert resolve_allocator(oracle.spec) == oracle
    assert setting_flags()["profile"] == (str, ["oracle"])
    config = SqueezeConfig.build(budget=0.2, policy="window", allocator="oracle", profile=profile)
    assert config.allocator.profile == profile


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        ("{not json", "not readable JSON"),
        (json.dumps({"kind": "other"}), "is not a sensitivity file"),
        (json.dumps({"kind": SENSITIVITY_KIND, "delta_nll": [0.1]}), "missing the model's identity"),
        (
            json.dumps(
                {"kind": SENSITIVITY_KIND, "model": {"num_hidden_layers": 3}, "delta_nll": [0.1, 0.2]}
            ),
            "one number per layer",
        ),
    ],
)
def test_bad_files_are_refused_by_name(tmp_path, content, message):
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises((ValueError, FileNotFoundError), match=message) as error:
        Oracle(profile=str(path))
    assert str(path) in str(error.value)


def test_settings_out_of_range_are_refused(tmp_path):
    with pytest.raises(ValueError, match="profile=''"):
        Oracle()
    with pytest.raises(ValueError, match=r"squeezed=10 must be in \[0, 10\)"):
        Oracle(profile=write_profile(tmp_path / "s.json"), squeezed=10)


def test_a_profile_of_another_model_or_layer_count_is_refused(tmp_path):
    llama = tiny_model("llama")
    own = model_identity(llama, "tiny")
    profile = write_profile(tmp_path / "own.json", [0.0] * 6, **{k: v for k, v in own.items() if k != "name"})
    Oracle(profile=profile).check_model(llama)
    with pytest.raises(ValueError, match="own.json.*model_type 'llama' there, 'qwen2' here"):
        Oracle(profile=profile).check_model(tiny_model("qwen2"))
    ten = Oracle(profile=write_profile(tmp_path / "ten.json"))
    with pytest.raises(ValueError, match="ten.json' holds 10 layers, the model 6"):
        ten.squeezed_layers(torch.zeros(6, dtype=torch.float64))
    other = dict(own, embedding_norm=own["embedding_norm"] * 1.01)
    drifted = write_profile(
        tmp_path / "drift.json", [0.0] * 6, **{k: v for k, v in other.items() if k != "name"}
    )
    with pytest.raises(ValueError, match="drift.json.*embedding norm"):
        Oracle(profile=drifted).check_model(llama)


def test_a_flag_overrides_the_spec_and_builds_an_oracle_from_its_name_alone(tmp_path):
    profile = write_profile(tmp_path / "s.json")
    config = SqueezeConfig.build(budget=0.2, allocator=f"oracle:profile={profile},squeezed=4", squeezed=2)
    assert (config.allocator.profile, config.allocator.squeezed) == (profile, 2)
    with pytest.raises(ValueError, match="profile=''"):
        SqueezeConfig.build(budget=0.2, allocator="oracle", p=0.5)
