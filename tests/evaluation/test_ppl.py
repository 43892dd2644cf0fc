import math

import pytest
from conftest import by_cell, results

from squeezekv.cli import main
from squeezekv.evaluation.tasks.ppl import Perplexity


def test_ppl_end_to_end_writes_results_summary_and_plots(eval_args, tmp_path):
    assert main(eval_args("ppl")) == 0
    out = tmp_path / "ppl"
    cells = by_cell(out)
    assert len(cells) == 1 + 2 * 2 * 2 and all(len(samples) == 2 for samples in cells.values())
    for record in results(out):
        assert record["tokens"] == 6
        assert record["metrics"]["ppl"] == pytest.approx(math.exp(record["nll_sum"] / 6))
    summary = (out / "summary.md").read_text()
    assert (
        "| full cache |" in summary and "| h2o × squeeze |" in summary and "ppl / full-cache ppl" in summary
    )
    assert (out / "ppl_vs_budget.png").stat().st_size > 0 and (out / "layers.png").stat().st_size > 0
    # the prompt is 36 tokens (3/4 of 48): budget 0.5 keeps 18 per layer on average, while scoring
    assert cells["h2o/squeeze/0.5"]["doc0"]["kv_tokens"] == 18


def test_keep_everything_budget_scores_exactly_like_the_full_cache(eval_args, tmp_path):
    assert main(eval_args("ppl")) == 0
    cells = by_cell(tmp_path / "ppl")
    for key in ("h2o/uniform/500", "h2o/squeeze/500", "window/squeeze/500"):
        for sample, full in cells["full"].items():
            # the CLI loads the model in float32 on CPU: equal up to float32 rounding
            assert cells[key][sample]["nll_sum"] == pytest.approx(full["nll_sum"], rel=1e-6)
    compressed, full = cells["h2o/uniform/0.5"]["doc0"]["nll_sum"], cells["full"]["doc0"]["nll_sum"]
    assert compressed != pytest.approx(full, rel=1e-4)


def test_rerun_skips_finished_cells_and_resumes_missing_ones(eval_args, tmp_path, monkeypatch):
    args = eval_args("ppl")
    assert main(args) == 0
    path = tmp_path / "ppl" / "results.jsonl"
    before = path.read_text()

    def must_not_run(*_):
        raise AssertionError("a finished cell was recomputed")

    monkeypatch.setattr(Perplexity, "evaluate", must_not_run)
    assert main(args) == 0
    assert path.read_text() == before
    monkeypatch.undo()

    lines = before.splitlines()
    assert '"cell": "window/squeeze/500"' in lines[-1]
    kept = [line for line in lines[:-1] if '"cell": "h2o/squeeze/0.5"' not in line]
    path.write_text("\n".join(kept) + "\n" + lines[-1][:20])  # the last line cut short, as by a kill
    calls = []
    original = Perplexity.evaluate

    def counting(self, model, tokenizer, samples, prepared, config):
        calls.append((config.policy.name, config.allocator.name, config.budget) if config else "full")
        return original(self, model, tokenizer, samples, prepared, config)

    monkeypatch.setattr(Perplexity, "evaluate", counting)
    assert main(args) == 0
    assert sorted(calls) == [("h2o", "squeeze", 0.5), ("window", "squeeze", 500)]
    assert len(path.read_text().splitlines()) == len(lines)


def test_an_equal_bytes_grid_compares_each_precision_with_16_bits(eval_args, tmp_path):
    grid = ("--budgets", "0.9", "--policies", "h2o", "--allocators", "uniform", "--kv-bits", "16,4")
    longer = ("--context", "120")  # a budget that pays for the 4-bit residual window
    assert main(eval_args("ppl", grid=(*grid, "--equal-bytes", *longer))) == 0
    summary = (tmp_path / "ppl" / "summary.md").read_text()
    assert "| h2o × uniform × 4-bit |" in summary and "residual window's tokens at 16 bits" in summary
    assert "### 4-bit uniform vs 16-bit uniform at equal memory: change of ppl in %" in summary
    assert "### samples on which 4-bit uniform beats 16-bit uniform (per-sample ppl, of 2)" in summary
