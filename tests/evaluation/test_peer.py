"""The peer path: real plumbing through a stand-in kvpress whose presses keep everything, plus a real
kvpress run when ``SQUEEZEKV_KVPRESS_PYTHON`` names the Python of an environment that has it."""

import os
import sys

import pytest
from conftest import by_cell

from squeezekv.cli import main


def peer_args(eval_args, task, python):
    return [
        *eval_args(task),
        "--peer",
        "kvpress",
        "--peer-python",
        str(python),
        "--peer-presses",
        "snapkv,observed",
    ]


def test_peer_cells_run_in_the_other_python_and_are_scored_like_ours(eval_args, stand_in_python, tmp_path):
    assert main(peer_args(eval_args, "ppl", stand_in_python)) == 0
    cells = by_cell(tmp_path / "ppl")
    for sample, full in cells["full"].items():
        for key in ("kvpress:snapkv/0.5", "kvpress:observed/500"):
            # eager attention there, SDPA here: equal up to float32 rounding of the log-softmax
            assert cells[key][sample]["nll_sum"] == pytest.approx(full["nll_sum"], rel=1e-6)
    assert "| kvpress snapkv |" in (tmp_path / "ppl" / "summary.md").read_text()


def test_peer_errors_name_what_is_missing(eval_args, tmp_path, capsys):
    assert main([*eval_args("ppl"), "--peer", "kvpress"]) == 2
    assert "needs --peer-python" in capsys.readouterr().err
    assert main(peer_args(eval_args, "ppl", tmp_path / "nope")) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(peer_args(eval_args, "ppl", sys.executable)) == 2
    assert "cannot import kvpress" in capsys.readouterr().err
    assert main([*peer_args(eval_args, "ppl", sys.executable), "--peer-presses", "magic"]) == 2
    assert "unknown kvpress presses ['magic']" in capsys.readouterr().err


def test_fidelity_has_no_peer_column(eval_args, stand_in_python, capsys):
    assert main(peer_args(eval_args, "fidelity", stand_in_python)) == 2
    assert "cannot run on a peer library" in capsys.readouterr().err


@pytest.mark.skipif(
    not os.environ.get("SQUEEZEKV_KVPRESS_PYTHON"),
    reason="set SQUEEZEKV_KVPRESS_PYTHON to a Python with kvpress",
)
@pytest.mark.parametrize("task", ["ppl", "passkey"])
def test_real_kvpress(eval_args, tmp_path, task):
    python = os.environ["SQUEEZEKV_KVPRESS_PYTHON"]
    args = [*eval_args(task), "--peer", "kvpress", "--peer-python", python]
    assert main(args) == 0
    cells = by_cell(tmp_path / task)
    presses = {key for key in cells if key.startswith("kvpress:")}
    assert len(presses) == 4 * 2
    if task == "ppl":  # a budget above the prompt compresses nothing
        for sample, full in cells["full"].items():
            assert cells["kvpress:snapkv/500"][sample]["nll_sum"] == pytest.approx(full["nll_sum"], rel=1e-6)
