import json
from pathlib import Path

import pytest
from conftest import by_cell

from squeezekv.cli import main
from squeezekv.evaluation.data import read_jsonl
from squeezekv.evaluation.tasks.longbench import DATASETS, FIELDS, middle_truncated, record_problem, score


def record(_id, dataset, context, question, answers, **extra):
    return {
        "_id": _id,
        "dataset": dataset,
        "context": context,
        "input": question,
        "answers": answers,
        **extra,
    }


RECORDS = [
    record("qa", "hotpotqa", "the key is what the cache keeps", "what", ["the cache"]),
    record(
        "ret",
        "passage_retrieval_en",
        "Paragraph 1: the budget\n\nParagraph 2: layer",
        "layer",
        ["Paragraph 2"],
    ),
    record("cls", "trec", "the cache : budget", "the layer :", ["budget"], all_classes=["budget", "layer"]),
]
BASE = {"context": "c", "input": "i", "answers": ["a"], "dataset": "hotpotqa"}


@pytest.fixture
def longbench_file(tmp_path):
    path = tmp_path / "lb.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in RECORDS))
    return path


def test_longbench_end_to_end(eval_args, longbench_file, tmp_path):
    args = eval_args("longbench") + ["--data", str(longbench_file), "--context", "120", "--limit", "3"]
    assert main(args) == 0
    cells = by_cell(tmp_path / "longbench")
    assert set(cells["full"]) == {"qa", "ret", "cls"}
    for sample, full in cells["full"].items():
        assert cells["h2o/uniform/500"][sample]["prediction"] == full["prediction"]
        assert full["metrics"]["score"] == score(full["dataset"], full["prediction"], *answers(sample))
    summary = (tmp_path / "longbench" / "summary.md").read_text()
    assert "### hotpotqa" in summary and "### trec" in summary


def answers(sample):
    record = next(r for r in RECORDS if r["_id"] == sample)
    return record["answers"], record.get("all_classes")


def test_scores_follow_each_datasets_metric():
    assert score("hotpotqa", "The cache.", ["the cache"], None) == 1.0
    assert score("passage_retrieval_en", "Paragraph 2", ["Paragraph 2"], None) == 1.0
    assert score("trec", "budget\nlayer", ["budget"], ["budget", "layer"]) == 1.0  # first line only
    assert score("lcc", "# note\nx = 1", ["x = 1"], None) == 1.0
    assert DATASETS["gov_report"].metric == "rouge_l" and DATASETS["gov_report"].new_tokens == 512


def test_middle_truncation_keeps_both_ends():
    assert middle_truncated(list(range(10)), 4) == [0, 1, 8, 9]
    assert middle_truncated([1, 2], 4) == [1, 2]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", ":2: not valid JSON"),
        (json.dumps({k: v for k, v in BASE.items() if k != "answers"}), ":2: missing field 'answers'"),
        (json.dumps({**BASE, "context": 3}), ":2: field 'context' has the wrong type"),
        (json.dumps({**BASE, "dataset": "nope"}), ":2: field 'dataset': unknown dataset"),
        (json.dumps({**BASE, "answers": []}), ":2: field 'answers' must be"),
        (json.dumps({**BASE, "dataset": "trec"}), ":2: field 'all_classes'"),
        ("[1, 2]", ":2: expected a JSON object"),
    ],
)
def test_malformed_jsonl_names_line_and_field(eval_args, tmp_path, capsys, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        read_jsonl(path, FIELDS, record_problem)
    out = tmp_path / "out"
    assert main(eval_args("longbench", out=out) + ["--data", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (out / "results.jsonl").exists()


def test_missing_and_unreadable_data_files(eval_args, tmp_path, capsys):
    assert main(eval_args("longbench") + ["--data", str(tmp_path / "none.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\xff\xfe\x00")
    assert main(eval_args("longbench") + ["--data", str(binary)]) == 2
    assert "cannot read data file" in capsys.readouterr().err


def test_shipped_sample_file_is_valid_and_answerable():
    records = read_jsonl(
        Path(__file__).parents[2] / "data" / "longbench_sample.jsonl", FIELDS, record_problem
    )
    assert len(records) >= 6 and len({r["dataset"] for r in records}) >= 5
    for record in records:
        if record["dataset"] == "multifieldqa_en":
            assert record["answers"][0] in record["context"]
