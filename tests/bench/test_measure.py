import pytest
import torch

from squeezekv import SqueezeConfig
from squeezekv.bench.measure import fitting_rows, measure_engine, measure_hf, timed_runs
from squeezekv.bench.shapes import build_model


@pytest.fixture(scope="module")
def model():
    return build_model("tiny", "cpu", 64)


def prompts(rows: int, tokens: int = 40) -> torch.Tensor:
    return torch.randint(3, 512, (rows, tokens), generator=torch.Generator().manual_seed(0))


def test_timed_runs_report_the_median_and_the_spread():
    m = timed_runs([0.5, 0.1, 0.2], [0.030, 0.010, 0.011], "full", batch=4)
    assert m.prefill_seconds == 0.2 and m.decode_ms_per_step == pytest.approx(11.0)
    assert m.decode_ms_runs == pytest.approx([30.0, 10.0, 11.0])  # every run, in order
    assert m.tokens_per_second == pytest.approx(4 / 0.011)  # from the median, not the slow outlier
    assert m.decode_spread == pytest.approx(20 / 11)
    assert timed_runs([0.1], [0.01], "full", batch=1).decode_spread is None


def test_fitting_rows_count_a_layers_widest_budget_for_every_row():
    budget = torch.tensor([[4, 2], [2, 4], [3, 3]])  # the same total per row, differently spread
    # one row: 4 + 2 + 2 free slots = 8; two rows: (4 + 4 + 2) * 2 = 20; three: (4 + 4 + 2) * 3 = 30
    assert fitting_rows(budget, layer_token_bytes=1.0, limit=8) == 1
    assert fitting_rows(budget, 1.0, limit=29) == 2
    assert fitting_rows(budget, 1.0, limit=30) == 3
    assert fitting_rows(budget, 2.0, limit=7) == 0
    # a packed cache's rows also take bytes whatever their slots: 10 each
    assert fitting_rows(budget, 1.0, limit=39, row_bytes=10) == 1
    assert fitting_rows(budget, 1.0, limit=60, row_bytes=10) == 3


def test_hf_paths_warm_up_then_time_each_repeat(model):
    ids = prompts(2)
    measurement, tokens = measure_hf(model, ids, new_tokens=5, repeats=3, path="hf_static")
    assert measurement.path == "hf_static" and measurement.batch == 2
    assert len(measurement.decode_ms_runs) == 3
    assert measurement.decode_ms_per_step == sorted(measurement.decode_ms_runs)[1]
    assert measurement.kv_bytes == 2 * 45 * 4 * 2 * 2 * 32 * 4  # the static cache: every slot it allocates
    expected = model.generate(ids, max_new_tokens=5, do_sample=False)[:, 40:]
    assert torch.equal(tokens, expected)  # the warm-up ran the full length


def test_engine_cuts_a_ragged_batch_to_the_rows_that_fit(model):
    config = SqueezeConfig(budget=0.25, policy="window", allocator="squeeze")
    ids = prompts(6)
    unlimited = measure_engine(model, ids, 6, config, "squeeze", repeats=2, cuda_graphs=False)
    assert unlimited.batch == 6 and len(unlimited.decode_ms_runs) == 2
    limit = unlimited.kv_bytes - 1
    cut = measure_engine(model, ids, 6, config, "squeeze", repeats=1, limit=limit, cuda_graphs=False)
    assert cut.batch < 6 and cut.kv_bytes <= limit
    assert cut.extra["cut_from_batch"] == 6


def test_a_packed_batch_is_cut_to_the_most_rows_that_fit(model):
    """Its residual windows and key-group tables cost per row, not per slot."""
    config = SqueezeConfig(budget=0.25, policy="h2o", allocator="uniform", kv_bits=8)
    ids = prompts(6)
    unlimited = measure_engine(model, ids, 6, config, "8-bit", repeats=1, cuda_graphs=False)
    per_row = unlimited.kv_bytes // 6
    cut = measure_engine(model, ids, 6, config, "8-bit", repeats=1, limit=4 * per_row + 1, cuda_graphs=False)
    assert cut.batch == 4 and cut.kv_bytes == 4 * per_row
