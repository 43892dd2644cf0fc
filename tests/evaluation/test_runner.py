import json

import pytest

from squeezekv.cli import main


def test_rerun_with_a_different_configuration_is_refused_and_overwrites_nothing(eval_args, tmp_path, capsys):
    args = eval_args("ppl")
    assert main(args) == 0
    out = tmp_path / "ppl"
    before = {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()}
    changed = [*args, "--budgets", "0.25,500"]
    assert main(changed) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "different configuration (differs in: budgets)" in err
    assert {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()} == before
    # how much, where and how fast it runs is not part of what it measures: a larger limit extends it
    assert main([*args, "--batch-size", "1", "--limit", "3"]) == 0
    assert len((out / "results.jsonl").read_text().splitlines()) == 3 * 9


def test_a_grid_extended_at_its_end_runs_only_the_new_cells(eval_args, tmp_path, capsys):
    grid = ("--budgets", "0.5", "--policies", "h2o", "--allocators", "uniform")
    out = tmp_path / "grown"
    assert main(eval_args("ppl", out=out, grid=grid)) == 0
    before = (out / "results.jsonl").read_text().splitlines()
    grown = ("--budgets", "0.5,500", "--policies", "h2o,window", "--allocators", "uniform")
    assert main(eval_args("ppl", out=out, grid=grown)) == 0
    assert "extending the stored run with more budgets, policies" in capsys.readouterr().err
    after = (out / "results.jsonl").read_text().splitlines()
    assert after[: len(before)] == before  # the measured cells are kept, not redone
    new_cells = {json.loads(line)["cell"] for line in after[len(before) :]}
    assert new_cells == {"h2o/uniform/500", "window/uniform/0.5", "window/uniform/500"}
    assert json.loads((out / "config.json").read_text())["policies"] == ["h2o", "window"]
    # an axis whose stored values are not kept in order is another grid
    assert main(eval_args("ppl", out=out, grid=("--budgets", "500", *grown[2:]))) == 2


def test_a_stored_run_grows_by_transformers_quantized_cache_cells(eval_args, tmp_path, capsys):
    """A run recorded without the peer (its config.json has no quantized_cache) gains its cells alone;
    they fill every budget column, and the summary says what their KV column counts."""
    grid = ("--budgets", "0.5,500", "--policies", "h2o", "--allocators", "uniform")
    out = tmp_path / "peer"
    assert main(eval_args("ppl", out=out, grid=grid)) == 0
    before = (out / "results.jsonl").read_text().splitlines()
    assert main(eval_args("ppl", out=out, grid=(*grid, "--quantized-cache", "4"))) == 0
    assert "extending the stored run with more quantized_cache" in capsys.readouterr().err
    after = (out / "results.jsonl").read_text().splitlines()
    assert after[: len(before)] == before
    assert {json.loads(line)["cell"] for line in after[len(before) :]} == {"transformers-quantized/4bit"}
    summary = (out / "summary.md").read_text()
    row = next(
        line for line in summary.splitlines() if line.startswith("| transformers QuantizedCache × 4-bit |")
    )
    assert row.count("|") == 4 and "| |" not in row  # a value under both budgets
    assert "their KV-tokens column is their bytes counted in 16-bit tokens" in summary


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--budgets", "1.5"], "budget 1.5 is a fraction"),
        (["--budgets", "0"], "budget 0 must be >= 1"),
        (["--budgets", "abc"], "budget 'abc' is not a number"),
        (["--budgets", "0.05", "--policies", "streaming"], "too small for policy"),
        (["--policies", "lru"], "unknown policy 'lru'"),
        (["--allocators", "fair"], "unknown allocator 'fair'"),
        (["--limit", "0"], "--limit 0 must be >= 1"),
        (["--context", "2000"], "--context 2000 exceeds the model's maximum of 256"),
    ],
)
def test_bad_options_exit_with_one_line(eval_args, tmp_path, capsys, extra, message):
    out = tmp_path / "bad"
    assert main([*eval_args("ppl", out=out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not out.exists()


def test_unknown_task_and_missing_model(eval_args, tmp_path, capsys):
    assert main(eval_args("nope")) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    args = eval_args("ppl")
    args[args.index("--model") + 1] = str(tmp_path / "missing")
    assert main(args) == 2
    assert "does not exist" in capsys.readouterr().err


def test_foreign_out_dirs_are_refused(eval_args, tmp_path, capsys):
    out = tmp_path / "foreign"
    out.mkdir()
    (out / "results.jsonl").write_text("{}\n")
    assert main(eval_args("ppl", out=out)) == 2
    assert "holds results but no config.json" in capsys.readouterr().err
    assert (out / "results.jsonl").read_text() == "{}\n"


def test_config_json_records_the_run(eval_args, tmp_path):
    assert main(eval_args("ppl")) == 0
    config = json.loads((tmp_path / "ppl" / "config.json").read_text())
    assert config["task"] == "ppl" and config["budgets"] == [0.5, 500]
    assert config["options"]["context"] == 48 and config["limit"] == 2
