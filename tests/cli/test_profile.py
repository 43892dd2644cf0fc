import json

import pytest

from squeezekv.cli import main
from squeezekv.evaluation import profiling
from squeezekv.reference import load_heldout


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    path = tmp_path_factory.mktemp("docs") / "docs.jsonl"
    path.write_text(
        "".join(json.dumps({"id": d["id"], "text": d["text"]}) + "\n" for d in load_heldout("short")[:3])
    )
    return path


def stability_args(docs, out, *extra):
    return ["profile", "--stability", "--data", str(docs), "--limit", "3", "--context", "64"] + [
        "--device",
        "cpu",
        "--out",
        str(out),
        *extra,
    ]


def test_stability_shows_progress_over_prompts(docs, tmp_path, capsys):
    assert main(stability_args(docs, tmp_path / "profile")) == 0
    captured = capsys.readouterr()
    assert "/3 [" in captured.err and "prompt/s" in captured.err  # a bar over 3 prompts (cleared at the end)
    assert json.loads((tmp_path / "profile" / "stability.json").read_text())["prompts"] == 3
    assert "mean pairwise Jaccard" in captured.out


def test_ctrl_c_writes_nothing(docs, tmp_path, capsys, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(profiling, "layer_profile", interrupted)
    assert main(stability_args(docs, tmp_path / "profile", "--no-progress")) == 130
    assert capsys.readouterr().err == "squeezekv: interrupted; rerun the same command to profile again\n"
    assert not (tmp_path / "profile").exists()
