from squeezekv.evaluation.grid import FULL, OWN, Cell, EvalConfig
from squeezekv.evaluation.summary import markdown, summarize, versus
from squeezekv.evaluation.tasks import TaskOptions, task_named


def records_for(scores: dict[str, list[float]]) -> dict:
    """Passkey-style records (a plain mean headline) for cells named by allocator."""
    return {
        (f"s{i}", Cell(OWN, "h2o", allocator, 0.2).key if allocator else Cell(FULL).key): {
            "metrics": {"accuracy": value},
            "kv_tokens": 1.0,
        }
        for allocator, values in scores.items()
        for i, value in enumerate(values)
    }


def comparison(scores: dict[str, list[float]]) -> str:
    config = EvalConfig("passkey", "m", (0.2,), ("h2o",), ("uniform", "squeeze"))
    samples = [f"s{i}" for i in range(len(scores["uniform"]))]
    lines = versus(
        config,
        task_named("passkey", TaskOptions()),
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


def test_every_allocator_is_measured_against_uniform_and_pyramid():
    """The goal is to beat both baselines: each other allocator gets both comparisons, pyramid gets
    the one against uniform, and uniform none against pyramid."""
    scores = {"": [1.0] * 40, "uniform": [1.0, 0.0] * 20, "pyramid": [0.0] * 40, "squeeze": [1.0] * 40}
    config = EvalConfig("passkey", "m", (0.2,), ("h2o",), ("uniform", "pyramid", "squeeze"))
    samples, records = [f"s{i}" for i in range(40)], records_for(scores)
    task = task_named("passkey", TaskOptions())
    summaries = summarize(task, config.cells(), samples, records)
    text = markdown(config, task, summaries, samples, records, len(samples))
    titles = [line.split(" at equal memory")[0] for line in text.splitlines() if " at equal memory" in line]
    assert titles == ["### pyramid vs uniform", "### squeeze vs uniform", "### squeeze vs pyramid"]
    assert "| h2o | +100.00* [+" in text.split("### squeeze vs uniform")[1]
