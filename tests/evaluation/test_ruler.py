"""The RULER-style suite: generated samples, scoring, and a tiny run with the reference model."""

import json
import re
from collections import Counter

import pytest

from squeezekv.evaluation.data import load_documents
from squeezekv.evaluation.grid import EvalConfig
from squeezekv.evaluation.metrics import string_match_all, string_match_part
from squeezekv.evaluation.runner import run_eval
from squeezekv.evaluation.tasks import TaskOptions, task_named
from squeezekv.evaluation.tasks.ruler import (
    SUBTASKS,
    Generator,
    largest_fitting,
    read_samples,
    until_eos,
    write_samples,
)


@pytest.fixture(scope="module")
def generator(reference):
    tokenizer, _ = reference
    return Generator(tokenizer, load_documents(None))


@pytest.fixture(scope="module")
def samples(generator):
    return {name: [generator.sample(name, 1024, index, seed=0) for index in range(2)] for name in SUBTASKS}


def test_samples_are_fixed_by_the_seed(generator, samples):
    again = generator.sample("niah_multikey_1", 1024, 1, seed=0)
    assert again == samples["niah_multikey_1"][1]
    assert generator.sample("niah_multikey_1", 1024, 1, seed=1).prompt != again.prompt


def test_prompt_and_answer_fill_the_target_length(samples):
    for name, pair in samples.items():
        for sample in pair:
            total = len(sample.prompt) + sample.facts["new_tokens"]
            # the haystack grows in whole units: a UUID needle is about 70 tokens of 1,024
            assert 0.92 * 1024 <= total <= 1024, (name, total)


def test_every_expected_answer_is_in_the_prompt(samples):
    for name, pair in samples.items():
        for sample in pair:
            text = sample.facts["text"]
            assert sample.facts["answers"] and all(answer in text for answer in sample.facts["answers"]), name
    needles = samples["niah_multivalue"][0].facts
    assert len(needles["answers"]) == 4 and len(needles["depths"]) == 4
    assert len(samples["niah_multikey_1"][0].facts["depths"]) == 4  # one asked, three distractor keys


def test_word_tasks_ask_for_the_most_frequent_words(samples):
    for name, top in (("cwe", 10), ("fwe", 3)):
        facts = samples[name][0].facts
        question = facts["text"].split("\n\n")[-1] if name == "cwe" else facts["text"]
        counts = Counter(re.findall(r"[a-z]+", question.split("Question")[0]))
        most = [word for word, _ in counts.most_common(top + 40) if word in facts["answers"]]
        assert len(most) == top and min(counts[w] for w in most) > max(
            c
            for w, c in counts.items()
            if w not in facts["answers"] and len(w) > 2 and w not in question[:400]
        ), name


def test_haystacks_come_from_every_source(generator):
    sources = len(generator.sources)
    prompts = [
        generator.sample("niah_single_2", 512, index, seed=0).facts["text"] for index in range(sources)
    ]
    starts = {text.split("\n")[1][:40] for text in prompts}
    assert sources > 10 and len(starts) == sources


def test_fitting_finds_the_largest_size():
    assert largest_fitting(lambda n: 10 + 7 * n, 1000) == 141
    assert largest_fitting(lambda n: 10 + n, 1000) == 990
    with pytest.raises(ValueError, match="without any haystack"):
        largest_fitting(lambda n: 2000 + n, 1000)


def test_scores_on_hand_made_outputs(reference):
    tokenizer, _ = reference
    assert string_match_all("The numbers are 1234567 and 7654321.", ["1234567", "7654321"]) == 1.0
    assert string_match_all("only 1234567", ["1234567", "7654321", "1111111", "2222222"]) == 0.25
    assert string_match_all("ABCDE, abcde", ["abcde"]) == 1.0  # case-insensitive, as RULER
    assert string_match_part("Paris, France", ["London", "paris"]) == 1.0
    assert string_match_part("Lyon", ["London", "Paris"]) == 0.0
    eos = tokenizer.eos_token_id
    assert until_eos([5, 6, eos, 7], tokenizer) == [5, 6]
    task = task_named("ruler", TaskOptions())
    results = [
        {"metrics": {"score": s}, "subtask": name, "length": 1024}
        for name, s in (("vt", 1.0), ("vt", 0.0), ("vt", 0.5), ("cwe", 1.0))
    ]
    assert task.aggregate(results) == {"score": 0.75, "cwe": 1.0, "vt": 0.5}
    values, weights, _ = task.bootstrap_terms(results)
    assert sum(v * w for v, w in zip(values, weights, strict=True)) / sum(weights) == 0.75


def test_bad_subtask_and_length_are_named(reference):
    _, model = reference
    with pytest.raises(ValueError, match="unknown RULER subtask.*niah_single_9"):
        task_named("ruler", TaskOptions(ruler_subtasks=("niah_single_9",))).samples(None, model)
    with pytest.raises(ValueError, match="RULER lengths 8192.*model's 4096"):
        task_named("ruler", TaskOptions(ruler_lengths=(8192,))).samples(None, model)


def test_tiny_run_writes_scores_and_samples(reference, tmp_path):
    tokenizer, model = reference
    options = TaskOptions(ruler_subtasks=("niah_single_1", "vt"), ruler_lengths=(512,), ruler_samples=2)
    config = EvalConfig(
        "ruler",
        "reference",
        budgets=(0.5,),
        policies=("window",),
        allocators=("uniform", "squeeze"),
        options=options,
    )
    summary = run_eval(config, model, tokenizer, tmp_path / "run", progress=False).read_text()
    records = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert len(records) == 4 * 3 and {r["subtask"] for r in records} == {"niah_single_1", "vt"}
    assert all(0.0 <= r["metrics"]["score"] <= 1.0 for r in records)
    assert "### niah_single_1" in summary and "### vt" in summary and "95 % paired bootstrap" in summary
    assert (tmp_path / "run" / "layers.png").is_file()
    samples = task_named("ruler", options).samples(tokenizer, model)
    written = [
        json.loads(line) for line in write_samples(samples, tmp_path / "s.jsonl").read_text().splitlines()
    ]
    assert [w["id"] for w in written] == [s.id for s in samples]
    assert written[0]["input_ids"] == tokenizer(written[0]["prompt"]).input_ids
    assert written[0]["answers"][0] in written[0]["prompt"] and written[0]["max_new_tokens"] == 128
    replayed = TaskOptions(samples_file=str(tmp_path / "s.jsonl"))
    assert task_named("ruler", replayed).samples(tokenizer, model) == samples  # the very same samples


def test_a_bad_samples_file_is_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a"}\n')
    with pytest.raises(ValueError, match="bad.jsonl: line 1 is not a RULER sample"):
        read_samples(bad)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_samples(tmp_path / "missing.jsonl")


def test_question_start_splits_context_from_question(reference, samples):
    tokenizer, _ = reference
    for name, pair in samples.items():
        for sample in pair:
            start = sample.facts["question_start"]
            context, asked = sample.prompt[:start], tokenizer.decode(sample.prompt[start:])
            assert 0 < start < len(sample.prompt), name
            assert asked.strip().split()[0] in {"What", "Question:"}, (name, asked[:40])
            assert "text above" in asked or "list above" in asked, name
            assert all(a in tokenizer.decode(context) for a in sample.facts["answers"]), name


def test_the_question_after_compression_is_fed_as_a_follow_up(samples):
    sample = samples["niah_single_1"][0]
    start = sample.facts["question_start"]
    aware = task_named("ruler", TaskOptions()).asked(sample)
    agnostic = task_named("ruler", TaskOptions(ruler_question="after-compression")).asked(sample)
    assert aware.prompt == sample.prompt and aware.question_start == start and aware.followup is None
    assert agnostic.prompt == sample.prompt[:start] and agnostic.followup == sample.prompt[start:]
    with pytest.raises(ValueError, match="ruler_question 'later' must be one of in-prompt, after"):
        task_named("ruler", TaskOptions(ruler_question="later")).samples(None, None)


def test_a_question_after_compression_on_a_keep_everything_budget_is_the_full_answer(reference, tmp_path):
    tokenizer, model = reference
    options = TaskOptions(
        ruler_subtasks=("niah_single_1",), ruler_lengths=(512,), ruler_samples=2,
        ruler_question="after-compression", engine="fast",
    )  # fmt: skip
    config = EvalConfig(
        "ruler", "reference", budgets=(1.0,), policies=("h2o",), allocators=("uniform",), options=options
    )
    run_eval(config, model, tokenizer, tmp_path / "run", progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    predictions = {}
    for record in records:
        predictions.setdefault(record["sample"], {})[record["cell"]] = record["prediction"]
    assert len(predictions) == 2
    for cells in predictions.values():  # nothing evicted: asking later is asking in the prompt
        assert cells["full"] == cells["h2o/uniform/1.0"]
