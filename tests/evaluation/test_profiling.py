import json

import pytest

from squeezekv.cli import main
from squeezekv.evaluation.profiling import Profile, adjusted_rand, jaccard, stability


def test_adjusted_rand_and_jaccard_by_hand():
    assert adjusted_rand([0, 0, 1, 1], [1, 1, 0, 0]) == 1.0  # same partition, other names
    # contingency [[1,1],[1,1]]: index 0, expected 2*2/6, max 2 -> (0 - 2/3) / (2 - 2/3) = -0.5
    assert adjusted_rand([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(-0.5)
    assert jaccard({1, 2}, {2, 3}) == pytest.approx(1 / 3)
    assert jaccard(set(), set()) == 1.0


def test_stability_counts_squeezed_layers():
    profiles = [
        Profile(10, [0.1, 0.5, 0.9, 0.95], [0, 1, 2, 2], {}),
        Profile(10, [0.1, 0.9, 0.5, 0.95], [0, 2, 1, 2], {}),
    ]
    result = stability(profiles)
    assert result.squeezed_frequency == [0.0, 0.5, 0.5, 1.0]
    assert result.mean_jaccard == pytest.approx(1 / 3)  # {2, 3} vs {1, 3}
    with pytest.raises(ValueError):
        stability(profiles[:1])


def test_profile_command_for_one_prompt(model_dir, tmp_path, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(" ".join(["the cache keeps only some tokens of every layer"] * 5))
    out = tmp_path / "profile"
    args = [
        "profile",
        "--model",
        str(model_dir),
        "--prompt-file",
        str(prompt),
        "--out",
        str(out),
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "similarity" in printed and "squeeze" in printed
    stored = json.loads((out / "profile.json").read_text())
    assert len(stored["similarity"]) == 6 and sum(stored["budgets"]["uniform"]) == sum(
        stored["budgets"]["squeeze"]
    )
    assert (out / "profile.png").stat().st_size > 0


def test_profile_stability_over_prompts(model_dir, docs_file, tmp_path, capsys):
    out = tmp_path / "stability"
    args = [
        "profile",
        "--model",
        str(model_dir),
        "--stability",
        "--data",
        str(docs_file),
        "--limit",
        "3",
        "--context",
        "60",
        "--out",
        str(out),
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    assert "adjusted Rand" in capsys.readouterr().out
    stored = json.loads((out / "stability.json").read_text())
    assert stored["prompts"] == 3 and len(stored["squeezed_frequency"]) == 6
    assert (out / "stability.png").stat().st_size > 0
    assert main([*args[:-4], "--limit", "1", "--out", str(out)]) == 2
    assert "at least 2 prompts" in capsys.readouterr().err
