import json
import logging

import pytest

from squeezekv.cli import main
from squeezekv.evaluation.store import ResultStore
from squeezekv.reference import load_heldout


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    """Two held-out documents, one longer than the model's 4,096 positions (windows are cut from it)."""
    path = tmp_path_factory.mktemp("docs") / "docs.jsonl"
    chosen = [
        load_heldout("long")[0],
        {**load_heldout("short")[0], "text": load_heldout("short")[0]["text"][:3000]},
    ]
    path.write_text("".join(json.dumps({"id": d["id"], "text": d["text"]}) + "\n" for d in chosen))
    return path


@pytest.fixture
def eval_args(docs):
    """A small ``squeezekv eval`` of the bundled reference model."""

    def build(out, *extra):
        return ["eval", "--task", "ppl", "--device", "cpu", "--context", "64", "--score-tokens", "8"] + [
            "--limit", "2", "--data", str(docs), "--budgets", "0.5", "--policies", "window", "--allocators",
            "uniform,squeeze", "--out", str(out), *extra,
        ]  # fmt: skip

    return build


def test_budgets_must_be_chosen(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["eval", "--task", "ppl", "--out", str(tmp_path / "run")])
    assert stopped.value.code == 2
    assert "the following arguments are required: --budgets" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_grid_is_announced_before_it_runs(eval_args, tmp_path, capsys):
    assert main(eval_args(tmp_path / "run")) == 0
    err = capsys.readouterr().err
    assert "grid: 3 cells (the full cache, 1 policy × 2 allocators × 1 budget) per sample" in err


def test_no_warning_about_documents_longer_than_the_model(eval_args, tmp_path, monkeypatch):
    """The held-out documents are cut into windows on purpose; transformers' warning is noise there."""
    warnings = []
    handler = logging.Handler()
    handler.emit = warnings.append
    logging.getLogger("transformers").addHandler(handler)
    try:
        assert main(eval_args(tmp_path / "run", "--no-progress")) == 0
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert not [w for w in warnings if "Token indices sequence length" in w.getMessage()]


def test_ctrl_c_leaves_whole_lines_and_a_rerun_resumes(eval_args, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    add = ResultStore.add
    calls = []

    def interrupted_at_the_fourth(store, record):
        calls.append(record)
        if len(calls) == 4:
            raise KeyboardInterrupt
        add(store, record)

    monkeypatch.setattr(ResultStore, "add", interrupted_at_the_fourth)
    assert main(eval_args(out, "--no-progress")) == 130
    err = capsys.readouterr().err
    assert err == "squeezekv: interrupted; rerun with the same --out to resume\n"
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line) for line in lines)
    monkeypatch.setattr(ResultStore, "add", add)
    assert main(eval_args(out, "--no-progress")) == 0
    after = (out / "results.jsonl").read_text().splitlines()
    assert after[:3] == lines and len(after) == 2 * 3  # only the missing results were computed
