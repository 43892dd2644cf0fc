"""``squeezekv eval``: every cell of the grid on the same samples, resumable, with summary and plots.

Samples are processed in batches; for each batch the full-cache preparation runs once, then every
unfinished cell. Each (sample, cell) result is appended to ``results.jsonl`` as soon as it exists,
and ``summary.md`` is rewritten after every batch, so a run cut short still leaves usable output.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from torch import nn
from tqdm import tqdm
from transformers.utils import logging

from squeezekv.evaluation.grid import FULL, OWN, QUANTIZED, Cell, EvalConfig
from squeezekv.evaluation.peer import check_peer, run_peer
from squeezekv.evaluation.profiling import layer_profile
from squeezekv.evaluation.store import ResultStore, write_atomic
from squeezekv.evaluation.summary import complete_samples, markdown, summarize
from squeezekv.evaluation.tasks import Sample, Task, task_named


def record(sample: Sample, cell: Cell, result: dict, seconds: float) -> dict:
    fields = {
        "method": cell.method,
        "policy": cell.policy,
        "allocator": cell.allocator,
        "budget": cell.budget,
        **({"kv_bits": cell.kv_bits} if cell.kv_bits != 16 else {}),
    }
    return {"sample": sample.id, "cell": cell.key, **fields, **result, "seconds": round(seconds, 4)}


@contextmanager
def whole_documents_tokenized() -> Iterator[None]:
    """Tasks tokenize whole documents and cut them to the model's length on purpose, so the
    tokenizer's warning that a sequence exceeds that length is noise here: silenced, only here."""
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)


def run_eval(config: EvalConfig, model: nn.Module, tokenizer, out: str | Path, progress: bool = True) -> Path:
    """Runs (or resumes) the grid into ``out``; returns the path of ``summary.md``."""
    task = task_named(config.task, config.options)
    if config.peer is not None:
        if not task.peer_supported:
            raise ValueError(f"task {config.task!r} cannot run on a peer library")
        check_peer(config.peer, config.peer_python)
    with whole_documents_tokenized():
        samples = task.samples(tokenizer, model)[: config.limit]
    ids = [sample.id for sample in samples]
    if len(set(ids)) != len(ids):
        raise ValueError(f"the {config.task} samples have repeated ids; give every record a unique id")
    cells = config.cells()
    for cell in cells:  # a budget too small for some prompt fails here, before anything is written
        for sample in samples if cell.method == OWN else ():
            config.cache_setting(cell).tokens_per_layer(len(sample.prompt))
    store = ResultStore(out, config)
    try:
        with tqdm(total=len(samples) * len(cells), disable=not progress, unit="cell") as bar:
            here = (FULL, QUANTIZED, OWN)  # run in this process; a peer's presses run in its own
            run_peers(
                config, task, tokenizer, samples, [c for c in cells if c.method not in here], store, bar
            )
            own = [cell for cell in cells if cell.method in here]
            for start in range(0, len(samples), config.batch_size):
                batch = samples[start : start + config.batch_size]
                run_batch(config, task, model, tokenizer, batch, own, store, bar)
                write_summary(config, task, samples, store)
    finally:
        store.close()
    write_plots(config, task, model, samples, store)
    return write_summary(config, task, samples, store)


def run_batch(config, task: Task, model, tokenizer, batch: list[Sample], cells, store, bar) -> None:
    pending = [cell for cell in cells if any(not store.done(s.id, cell.key) for s in batch)]
    bar.update(len(batch) * (len(cells) - len(pending)))
    if not pending:
        return
    prepared = dict(zip([s.id for s in batch], task.prepare(model, tokenizer, batch), strict=True))
    for cell in pending:
        todo = [s for s in batch if not store.done(s.id, cell.key)]
        bar.set_postfix_str(f"{cell.key} ({len(todo)} samples)")
        started = time.perf_counter()
        results = task.evaluate(
            model, tokenizer, todo, [prepared[s.id] for s in todo], config.cache_setting(cell)
        )
        seconds = (time.perf_counter() - started) / len(todo)
        for sample, result in zip(todo, results, strict=True):
            store.add(record(sample, cell, result, seconds))
        bar.update(len(batch))


def run_peers(config, task: Task, tokenizer, samples, cells, store, bar) -> None:
    by_id = {sample.id: sample for sample in samples}
    jobs = [
        (s.id, cell, task.peer_job(s)) for cell in cells for s in samples if not store.done(s.id, cell.key)
    ]
    bar.update(len(samples) * len(cells) - len(jobs))
    if not jobs:
        return
    model = config.model
    started = time.perf_counter()
    for sample_id, cell, output in run_peer(
        config.peer, config.peer_python, model, config.device, config.dtype, jobs
    ):
        sample = by_id[sample_id]
        seconds, started = time.perf_counter() - started, time.perf_counter()
        store.add(record(sample, cell, task.peer_result(tokenizer, sample, output), seconds))
        bar.set_postfix_str(cell.key)
        bar.update(1)


def write_summary(config: EvalConfig, task: Task, samples: list[Sample], store: ResultStore) -> Path:
    cells = config.cells()
    complete = complete_samples([s.id for s in samples], cells, store.records)
    summaries = summarize(task, cells, complete, store.records)
    path = store.directory / "summary.md"
    write_atomic(path, markdown(config, task, summaries, complete, store.records, len(samples)))
    return path


def write_plots(config: EvalConfig, task: Task, model, samples: list[Sample], store: ResultStore) -> None:
    """metric vs budget; the first sample's layer profile; passkey heat maps (one per cell)."""
    from squeezekv.evaluation import plots  # imported here: measuring needs no plotting library

    cells = config.cells()
    complete = complete_samples([s.id for s in samples], cells, store.records)
    summaries = summarize(task, cells, complete, store.records)
    if summaries:
        path = store.directory / f"{task.metric}_vs_budget.png"
        plots.metric_vs_budget(summaries, list(config.budgets), task.metric, path)
    middle = config.budgets[len(config.budgets) // 2]
    squeeze = config.cache_setting(Cell(OWN, config.policies[0], config.allocators[0], middle))
    profile = layer_profile(model, samples[0].prompt, squeeze, list(config.allocators))
    plots.layer_profile(profile.similarity, profile.budgets, profile.squeezed, store.directory / "layers.png")
    if task.heat_map is not None and complete:
        rows_key, columns_key = task.heat_map
        heat_maps = store.directory / "heatmaps"
        heat_maps.mkdir(exist_ok=True)
        for cell in cells:
            results = [store.records[(s, cell.key)] for s in complete]
            rows = sorted({r[rows_key] for r in results})
            columns = sorted({r[columns_key] for r in results})
            grid = [
                [mean_metric(results, task.metric, rows_key, row, columns_key, column) for column in columns]
                for row in rows
            ]
            name = cell.key.replace("/", "_").replace(":", "_")
            plots.heat_map(
                grid,
                rows,
                columns,
                cell.row + (f" @ {cell.budget}" if cell.budget else ""),
                heat_maps / f"{name}.png",
            )


def mean_metric(results, metric, rows_key, row, columns_key, column) -> float:
    values = [r["metrics"][metric] for r in results if r[rows_key] == row and r[columns_key] == column]
    return sum(values) / len(values) if values else float("nan")
