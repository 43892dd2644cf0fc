import pytest
from conftest import by_cell

from squeezekv.cli import main


def test_fidelity_full_cache_agrees_with_itself_and_compression_moves_it(eval_args, tmp_path):
    assert main(eval_args("fidelity")) == 0
    out = tmp_path / "fidelity"
    cells = by_cell(out)
    for sample in ("doc0", "doc1"):
        for key in ("full", "h2o/uniform/500", "window/squeeze/500"):
            assert cells[key][sample]["metrics"]["kl"] == pytest.approx(0.0, abs=1e-6)  # float32 rounding
            assert cells[key][sample]["metrics"]["top1"] == 1.0
    assert any(cells["window/uniform/0.5"][s]["metrics"]["kl"] > 1e-4 for s in ("doc0", "doc1"))
    summary = (out / "summary.md").read_text()
    assert "### kl" in summary and "### top1" in summary
    assert (out / "kl_vs_budget.png").is_file()
