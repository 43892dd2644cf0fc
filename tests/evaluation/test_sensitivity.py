import json

import pytest
import torch
from conftest import by_cell

import squeezekv
from squeezekv import SqueezeConfig
from squeezekv.allocators.oracle import Oracle
from squeezekv.cli import main

from models import prompts, tiny_model


@pytest.fixture(scope="module")
def measured(model_dir, docs_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("sensitivity") / "tiny.json"
    args = ["profile", "--sensitivity", str(out), "--model", str(model_dir), "--data", str(docs_file)]
    args += ["--context", "48", "--score-tokens", "6", "--limit", "2", "--skip", "1", "--budget", "0.5"]
    assert main([*args, "--device", "cpu", "--no-progress"]) == 0
    return out


def test_sensitivity_file_round_trips_into_the_oracle(measured, model_dir):
    stored = json.loads(measured.read_text())
    assert stored["documents"] == ["doc1", "doc2"]  # --skip 1 --limit 2
    assert stored["model"]["name"] == model_dir.name and stored["model"]["num_hidden_layers"] == 6
    assert stored["settings"] == {
        "budget": 0.5,
        "policy": "window",
        "p": 0.35,
        "context": 48,
        "score_tokens": 6,
        "data": stored["settings"]["data"],
        "skip": 1,
    }
    assert len(stored["delta_nll"]) == len(stored["kl"]) == 6 and stored["tokens"] == 12
    assert all(kl >= 0 for kl in stored["kl"]) and any(delta != 0 for delta in stored["delta_nll"])
    oracle = Oracle(profile=str(measured), squeezed=2)
    least = sorted(range(6), key=lambda layer: (stored["delta_nll"][layer], layer))[:2]
    assert set(oracle.squeezed_layers(torch.zeros(6)).nonzero().flatten().tolist()) == set(least)


def test_the_oracle_runs_in_a_session_and_refuses_another_model(measured):
    config = SqueezeConfig(budget=0.5, policy="window", allocator=f"oracle:profile={measured},squeezed=2")
    ids = prompts([40])[0][None]
    result = squeezekv.generate(tiny_model("llama"), ids, config, max_new_tokens=2)
    budgets = result.stats.layer_budget[0]
    assert int(budgets.sum()) == 6 * 20 and int((budgets == 7).sum()) == 2  # 0.35 x 20 tokens
    with pytest.raises(ValueError, match="tiny.json' was measured on another model"):
        squeezekv.generate(tiny_model("mistral"), ids, config, max_new_tokens=2)


def test_eval_takes_the_oracle_as_a_spec(measured, eval_args, tmp_path):
    grid = ("--budgets", "0.5", "--policies", "window", "--allocators", f"uniform,oracle:profile={measured}")
    assert main(eval_args("ppl", tmp_path / "run", grid)) == 0
    assert f"window/oracle:profile={measured}/0.5" in by_cell(tmp_path / "run")


def test_bad_sensitivity_arguments_are_named(measured, model_dir, docs_file, tmp_path, capsys):
    base = [
        "profile",
        "--model",
        str(model_dir),
        "--data",
        str(docs_file),
        "--context",
        "48",
        "--device",
        "cpu",
    ]
    assert main([*base, "--sensitivity", str(tmp_path / "x.txt")]) != 0
    assert "x.txt' must name a .json file" in capsys.readouterr().err
    assert main([*base, "--sensitivity", str(tmp_path / "x.json"), "--skip", "9"]) != 0
    assert "--skip 9: only 3 ppl windows" in capsys.readouterr().err
