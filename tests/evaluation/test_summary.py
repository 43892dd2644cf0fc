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


HALF, ALL, NONE = [1.0, 0.0] * 20, [1.0] * 40, [0.0] * 40
PRECISION_SCORES = {
    ("uniform", 16): HALF, ("uniform", 8): NONE, ("squeeze", 16): NONE, ("squeeze", 8): ALL,
    ("squeeze-bits", 16): HALF,
}  # fmt: skip


def precision_grid(changed: dict[tuple[str, int], list[float]] | None = None) -> str:
    """The summary of an equal-bytes passkey grid whose cells (allocator, kv bits) score
    ``PRECISION_SCORES``, those in ``changed`` as it says."""
    config = EvalConfig(
        "passkey", "m", (0.2,), ("h2o",), ("uniform", "squeeze", "squeeze-bits"), kv_bits=(16, 8),
        equal_bytes=True,
    )  # fmt: skip
    scores = {**PRECISION_SCORES, **(changed or {})}
    samples = [f"s{i}" for i in range(40)]
    records = {
        (sample, Cell(OWN, "h2o", allocator, 0.2, bits).key if allocator else Cell(FULL).key): {
            "metrics": {"accuracy": values[index]},
            "kv_tokens": 1.0,
        }
        for (allocator, bits), values in {("", 16): ALL, **scores}.items()
        for index, sample in enumerate(samples)
    }
    task = task_named("passkey", TaskOptions())
    summaries = summarize(task, config.cells(), samples, records)
    return markdown(config, task, summaries, samples, records, len(samples))


def test_a_grid_of_fewer_bits_alone_is_summarized_without_16_bit_comparisons():
    """``--kv-bits 8,4`` runs no 16-bit cell: the summary has its tables, and no comparison that
    would need one (this once failed with a KeyError after the first batch)."""
    config = EvalConfig(
        "passkey", "m", (0.2,), ("h2o",), ("uniform", "squeeze"), kv_bits=(8, 4), equal_bytes=True
    )
    samples = [f"s{i}" for i in range(6)]
    records = {
        (sample, cell.key): {"metrics": {"accuracy": float(i % 2)}, "kv_tokens": 1.0}
        for cell in config.cells()
        for i, sample in enumerate(samples)
    }
    task = task_named("passkey", TaskOptions())
    text = markdown(config, task, summarize(task, config.cells(), samples, records), samples, records, 6)
    assert "| h2o × uniform × 8-bit |" in text and "| h2o × squeeze × 4-bit |" in text
    assert "16-bit" not in text.split("### accuracy")[1] and " vs " not in text


def best_mix_row(changed: dict[tuple[str, int], list[float]] | None = None) -> str:
    text = precision_grid(changed)
    return text.split("### best fewer-bit cell vs best 16-bit cell")[1].splitlines()[4]


def test_each_allocator_at_fewer_bits_is_measured_against_itself_at_16():
    """At equal bytes every allocator's fewer-bit cells meet its own 16-bit cells; an allocator that
    plans bits (squeeze-bits) has no cell at 8 bits and gets no such comparison."""
    text = precision_grid()
    titles = [line.split(" at equal memory")[0] for line in text.splitlines() if " at equal memory" in line]
    assert "### 8-bit uniform vs 16-bit uniform" in titles and "### 8-bit squeeze vs 16-bit squeeze" in titles
    assert not any("8-bit squeeze-bits" in title for title in titles)
    assert "| h2o | -100.00* [" in text.split("### 8-bit uniform vs 16-bit uniform")[1]


def test_the_best_fewer_bit_cell_meets_the_best_16_bit_cell():
    """Each side's best cell by its mean: 8-bit squeeze (every sample) against 16-bit uniform (every
    other one); squeeze-bits counts as a fewer-bit cell, and wins the side once 8-bit squeeze fails."""
    row = best_mix_row()
    assert row.startswith("| h2o | 8-bit squeeze vs 16-bit uniform: +100.00* [+")
    assert row.endswith(", 20 / 0 |")
    row = best_mix_row({("squeeze", 8): NONE, ("uniform", 16): ALL})
    assert row.startswith("| h2o | squeeze-bits vs 16-bit uniform: -50.00* [")
    assert row.endswith(", 0 / 20 |")
