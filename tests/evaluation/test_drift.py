"""Answer drift: the full cache's greedy answer is the reference each cell is scored against."""

import json

from squeezekv.evaluation.grid import EvalConfig
from squeezekv.evaluation.runner import run_eval
from squeezekv.evaluation.tasks import TaskOptions, task_named
from squeezekv.evaluation.tasks.drift import REQUESTS, chat_prompt


def test_samples_cycle_requests_over_sources_and_fit_the_context(reference):
    tokenizer, model = reference
    samples = task_named("drift", TaskOptions(context=300)).samples(tokenizer, model)
    assert all(len(sample.prompt) <= 300 - 64 for sample in samples)
    assert [s.facts["request"] for s in samples[: len(REQUESTS)]] == list(REQUESTS)
    assert len({s.facts["source"] for s in samples[:20]}) == 20  # one source after another
    assert chat_prompt(tokenizer, "Hi") == tokenizer("Hi\nAnswer:").input_ids  # no chat template: plain text


def test_full_cache_matches_itself_and_compressed_cells_are_scored(reference, tmp_path):
    tokenizer, model = reference
    config = EvalConfig(
        "drift",
        "reference",
        budgets=(0.1,),
        policies=("window",),
        allocators=("uniform",),
        limit=2,
        options=TaskOptions(context=256),
    )
    run_eval(config, model, tokenizer, tmp_path, progress=False)
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    full = {r["sample"]: r for r in records if r["cell"] == "full"}
    assert len(full) == 2 and all(r["metrics"] == {"exact": 1.0, "rouge_l": 1.0} for r in full.values())
    for record in records:
        if record["cell"] != "full":
            assert record["reference"] == full[record["sample"]]["prediction"]
            assert record["metrics"]["exact"] == float(record["prediction"] == record["reference"])
            assert 0.0 <= record["metrics"]["rouge_l"] <= 1.0
