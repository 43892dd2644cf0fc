import json

from conftest import results

from squeezekv.cli import main


def test_a_bad_line_is_set_aside_and_only_its_result_redone(eval_args, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(eval_args("ppl", out=out)) == 0
    lines = (out / "results.jsonl").read_text().splitlines()
    damaged = json.loads(lines[3])
    kept = lines[:3] + lines[4:]
    (out / "results.jsonl").write_text("\n".join([*lines[:3], "garbage {", *lines[4:]]) + "\n")
    capsys.readouterr()
    assert main(eval_args("ppl", out=out)) == 0
    err = capsys.readouterr().err
    assert "results.jsonl:4: not a results line; moved to results.jsonl.bad" in err
    assert (out / "results.jsonl.bad").read_text() == "garbage {\n"
    after = (out / "results.jsonl").read_text().splitlines()
    assert after[: len(kept)] == kept  # the good lines stay as they were
    (redone,) = [json.loads(line) for line in after[len(kept) :]]  # one result computed again
    assert (redone["sample"], redone["cell"]) == (damaged["sample"], damaged["cell"])
    assert len(results(out)) == len(lines)


def test_an_unfinished_last_line_is_dropped_and_redone(eval_args, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(eval_args("ppl", out=out)) == 0
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text("".join(line + "\n" for line in lines[:-1]) + lines[-1][:20])
    assert main(eval_args("ppl", out=out)) == 0
    assert "dropping an unfinished last line" in capsys.readouterr().err
    after = (out / "results.jsonl").read_text().splitlines()
    assert after[:-1] == lines[:-1] and len(after) == len(lines)
    assert (json.loads(after[-1])["sample"], json.loads(after[-1])["cell"]) == (
        json.loads(lines[-1])["sample"],
        json.loads(lines[-1])["cell"],
    )
    assert not (out / "results.jsonl.bad").exists()


def test_a_corrupt_config_json_is_named(eval_args, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(eval_args("ppl", out=out)) == 0
    (out / "config.json").write_text('{"task": "ppl",')
    capsys.readouterr()
    assert main(eval_args("ppl", out=out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{out / 'config.json'}: not a readable run configuration" in err
