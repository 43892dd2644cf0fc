from squeezekv.evaluation.grid import OWN, Cell, EvalConfig
from squeezekv.evaluation.summary import versus
from squeezekv.evaluation.tasks import TASKS


def records_for(scores: dict[str, list[float]]) -> dict:
    """Passkey-style records (a plain mean headline) for cells named by allocator."""
    return {
        (f"s{i}", Cell(OWN, "h2o", allocator, 0.2).key): {"metrics": {"accuracy": value}}
        for allocator, values in scores.items()
        for i, value in enumerate(values)
    }


def comparison(scores: dict[str, list[float]]) -> str:
    config = EvalConfig("passkey", "m", (0.2,), ("h2o",), ("uniform", "squeeze"))
    samples = [f"s{i}" for i in range(len(scores["uniform"]))]
    lines = versus(
        config,
        TASKS["passkey"],
        samples,
        records_for(scores),
        ("squeeze", "squeeze", 16),
        ("uniform", "uniform", 16),
    )
    return lines[4]


def test_a_clear_win_is_marked_with_its_interval():
    row = comparison({"uniform": [1.0, 0.0] * 20, "squeeze": [1.0] * 40})
    assert row.startswith("| h2o | +100.00* [+")


def test_a_base_that_averages_zero_on_some_resamples_gets_no_interval():
    """A relative change over a mean of 0 is undefined: the row says so instead of printing nan."""
    row = comparison({"uniform": [0.0] * 39 + [1.0], "squeeze": [1.0] * 40})
    assert "no interval: uniform averages 0 on some resamples" in row and "nan" not in row
