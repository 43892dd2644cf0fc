"""Turning results into per-cell aggregates and the ``summary.md`` tables.

Only samples finished in every cell are aggregated, so all cells of a table compare the same
samples, also for a partial run. Every allocator is compared with ``uniform`` and ``pyramid`` at
equal memory with a paired bootstrap interval, so a stated win is one the samples support; at equal
bytes, each allocator's fewer-bit cells are compared with its 16-bit ones, and the best fewer-bit
cell with the best 16-bit one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from squeezekv.evaluation.grid import FULL, OWN, Cell, EvalConfig, plans_bits
from squeezekv.evaluation.metrics import paired_bootstrap
from squeezekv.evaluation.tasks import Task
from squeezekv.ops.quantize import KEY_GROUP_TOKENS


@dataclass(frozen=True)
class CellSummary:
    cell: Cell
    metrics: dict[str, float]
    kv_tokens: float


def complete_samples(sample_ids: list[str], cells: list[Cell], records: dict) -> list[str]:
    return [s for s in sample_ids if all((s, cell.key) in records for cell in cells)]


def summarize(task: Task, cells: list[Cell], samples: list[str], records: dict) -> list[CellSummary]:
    if not samples:
        return []
    summaries = []
    for cell in cells:
        results = [records[(sample, cell.key)] for sample in samples]
        kv = sum(r["kv_tokens"] for r in results) / len(results)
        summaries.append(CellSummary(cell, task.aggregate(results), kv))
    return summaries


def table(config: EvalConfig, summaries: list[CellSummary], value) -> list[str]:
    """Markdown rows: one per policy × allocator (and peer press), one column per budget; a cell
    without a budget (transformers' ``QuantizedCache``) fills every column, as the full cache does."""
    by_key = {(s.cell.row, s.cell.budget): s for s in summaries if s.cell.method != FULL}
    full = next(s for s in summaries if s.cell.method == FULL)
    rows = list(dict.fromkeys(s.cell.row for s in summaries if s.cell.method != FULL))
    lines = [
        "| | " + " | ".join(f"budget {b}" for b in config.budgets) + " |",
        "|---|" + "---:|" * len(config.budgets),
        f"| full cache | {' | '.join(value(full, full) for _ in config.budgets)} |",
    ]
    for row in rows:
        cells = [by_key.get((row, budget)) or by_key.get((row, None)) for budget in config.budgets]
        lines.append(f"| {row} | " + " | ".join(value(s, full) if s else "" for s in cells) + " |")
    return lines


def policy_budget_table(title: str, config: EvalConfig, cell) -> list[str]:
    """A titled table with one row per policy and one column per budget; ``cell(policy, budget)``."""
    lines = [
        f"### {title}",
        "",
        "| policy | " + " | ".join(f"budget {b}" for b in config.budgets) + " |",
        "|---|" + "---:|" * len(config.budgets),
    ]
    for policy in config.policies:
        lines.append(f"| {policy} | " + " | ".join(cell(policy, budget) for budget in config.budgets) + " |")
    return lines


BASELINES = ("uniform", "pyramid")  # every other allocator is measured against each; pyramid against uniform


def headline_terms(task: Task, results: list[dict]):
    """Per-sample values and weights whose weighted mean, through ``transform``, is the headline metric.

    A task whose headline is not a plain mean over samples says how to rebuild it with a
    ``bootstrap_terms(results) -> (values, weights, transform)`` method (perplexity: mean NLL per
    document weighted by its tokens, then exp; RULER: scores weighted to average the subtasks).
    """
    terms = getattr(task, "bootstrap_terms", None)
    if terms is not None:
        return terms(results)
    return [r["metrics"][task.metric] for r in results], None, None


def relative_change(
    task: Task, samples: list[str], records: dict, ours: str, base: str, base_name: str
) -> str:
    """Cell ``ours`` against cell ``base`` (keys) over ``samples``: the relative change of the
    headline metric in % (positive: ``ours`` better) with its paired 95 % interval, ``*`` where the
    interval excludes 0.

    The interval comes from 2,000 paired bootstrap resamples of the samples (seed 0); only a change
    marked ``*`` says one cell beats the other."""
    sign = 1.0 if task.higher_is_better else -1.0
    values, weights, transform = headline_terms(task, [records[(s, ours)] for s in samples])
    base_values, _, _ = headline_terms(task, [records[(s, base)] for s in samples])
    transform = transform or (lambda x: x)

    def relative(mean_a, mean_b):
        a, b = transform(mean_a), transform(mean_b)
        return 100 * sign * (a - b) / np.where(b == 0, np.nan, np.abs(b))

    interval = paired_bootstrap(values, base_values, weights, relative)
    if np.isnan(interval.difference):
        return "n/a"
    if np.isnan(interval.low):  # the base cell's mean is 0 on some resamples: no relative interval
        return f"{interval.difference:+.2f} [no interval: {base_name} averages 0 on some resamples]"
    mark = "*" if interval.decided else ""
    return f"{interval.difference:+.2f}{mark} [{interval.low:+.2f}, {interval.high:+.2f}]"


def wins(task: Task, samples: list[str], records: dict, ours: str, base: str) -> int:
    """On how many of ``samples`` cell ``ours`` scores better than cell ``base`` (keys)."""
    sign = 1.0 if task.higher_is_better else -1.0

    def value(sample: str, key: str) -> float:
        return sign * records[(sample, key)]["metrics"][task.metric]

    return sum(value(s, ours) > value(s, base) for s in samples)


def versus(
    config: EvalConfig,
    task: Task,
    samples: list[str],
    records: dict,
    ours: tuple[str, str, int],
    base: tuple[str, str, int],
) -> list[str]:
    """One kind of cell against another at equal memory, per policy and budget: the relative
    change with its paired 95 % interval (:func:`relative_change`), and on how many samples it wins.
    ``ours`` and ``base`` are (what the tables call it, allocator, kv bits)."""
    (name, allocator, bits), (base_name, base_allocator, base_bits) = ours, base

    def keys(policy: str, budget) -> tuple[str, str]:
        base_key = Cell(OWN, policy, base_allocator, budget, base_bits).key
        return Cell(OWN, policy, allocator, budget, bits).key, base_key

    def change(policy: str, budget) -> str:
        return relative_change(task, samples, records, *keys(policy, budget), base_name)

    def won(policy: str, budget) -> str:
        return str(wins(task, samples, records, *keys(policy, budget)))

    title = (
        f"{name} vs {base_name} at equal memory: change of {task.metric} in % (positive: {name} "
        "better), 95 % paired bootstrap interval; * the interval excludes 0"
    )
    counted = f"samples on which {name} beats {base_name} (per-sample {task.metric}, of {len(samples)})"
    return [
        *policy_budget_table(title, config, change),
        "",
        *policy_budget_table(counted, config, won),
        "",
    ]


def cell_name(cell: Cell) -> str:
    """How the comparisons of precisions call a cell: ``8-bit squeeze``, ``squeeze-bits``."""
    return cell.allocator if plans_bits(cell.allocator) else f"{cell.kv_bits}-bit {cell.allocator}"


def best_mix(
    config: EvalConfig, task: Task, summaries: list[CellSummary], samples: list[str], records: dict
) -> list[str]:
    """Per policy and budget, the best cell that stores fewer than 16 bits (or plans bits) against
    the best 16-bit cell, at equal bytes: the question of fewer bits for more tokens, asked of each
    side at its best. Each side's best is chosen by its mean on these same samples, so a win here is
    one to confirm on samples that did not choose it."""
    better = max if task.higher_is_better else min
    own = [s for s in summaries if s.cell.method == OWN]

    def compared(policy: str, budget) -> str:
        here = [s for s in own if s.cell.policy == policy and s.cell.budget == budget]
        mixes = [s for s in here if s.cell.kv_bits != 16 or plans_bits(s.cell.allocator)]
        sixteen = [s for s in here if s.cell.kv_bits == 16 and not plans_bits(s.cell.allocator)]
        if not mixes or not sixteen:
            return ""
        mix, full = (better(side, key=lambda s: s.metrics[task.metric]).cell for side in (mixes, sixteen))
        change = relative_change(task, samples, records, mix.key, full.key, cell_name(full))
        won = wins(task, samples, records, mix.key, full.key)
        lost = wins(task, samples, records, full.key, mix.key)
        return f"{cell_name(mix)} vs {cell_name(full)}: {change}, {won} / {lost}"

    title = (
        f"best fewer-bit cell vs best 16-bit cell at equal bytes (each the best mean {task.metric} here): "
        f"change of {task.metric} in % (positive: fewer bits better), 95 % paired bootstrap interval, "
        "* the interval excludes 0; samples won / lost"
    )
    return [*policy_budget_table(title, config, compared), ""]


def share_of_full(
    config: EvalConfig, task: Task, summaries: list[CellSummary], samples: list[str], records: dict
) -> list[str]:
    """Each cell's headline metric as a percentage of the full cache's, with its paired 95 % interval
    (2,000 bootstrap resamples of the samples, seed 0): what a cell keeps of the uncompressed answer."""

    def share(summary: CellSummary, full: CellSummary) -> str:
        values, weights, transform = headline_terms(task, [records[(s, summary.cell.key)] for s in samples])
        full_values, _, _ = headline_terms(task, [records[(s, full.cell.key)] for s in samples])
        transform = transform or (lambda x: x)

        def percent(mean_a, mean_b):
            base = transform(mean_b)
            return 100 * transform(mean_a) / np.where(base == 0, np.nan, base)

        interval = paired_bootstrap(values, full_values, weights, percent)
        if np.isnan(interval.difference):
            return "n/a"
        return f"{interval.difference:.1f} [{interval.low:.1f}, {interval.high:.1f}]"

    title = f"### {task.metric} as % of the full cache's, 95 % paired bootstrap interval"
    return [title, "", *table(config, summaries, share), ""]


def precision_note(config: EvalConfig) -> list[str]:
    """What the kv bits of the rows mean (nothing for a grid at 16 bits alone)."""
    peer = [
        "- transformers QuantizedCache rows (the quanto backend) keep every token at 2 or 4 bits, its "
        "newest 128 unquantized; their KV-tokens column is their bytes counted in 16-bit tokens "
        "(codes as stored, scales and shifts at 2 bytes), the unit of squeezekv's equal-bytes budgets"
    ]
    if config.kv_bits == (16,) and not config.equal_bytes:
        return peer if config.quantized_cache else []
    bits = ", ".join(str(b) for b in config.kv_bits)
    unit = (
        "budgets count 16-bit tokens' bytes: a quantized cell keeps as many tokens as fit in them, scales "
        "and zeros counted and the residual window's tokens at 16 bits (docs/quantization.md), so every "
        "column is at equal bytes"
        if config.equal_bytes
        else "budgets count tokens at any precision, so quantized cells hold fewer bytes"
    )
    note = f"- key-value precision: {bits} bits (rows marked × 8-bit, × 4-bit; unmarked: 16); {unit}"
    if config.kv_group != KEY_GROUP_TOKENS:
        note += f"; key groups (and residual windows) of {config.kv_group} tokens"
    return [note, *(peer if config.quantized_cache else [])]


def markdown(
    config: EvalConfig,
    task: Task,
    summaries: list[CellSummary],
    samples: list[str],
    records: dict,
    total: int,
) -> str:
    direction = "higher" if task.higher_is_better else "lower"
    peer_note = [
        f"- {config.peer} presses compress the prompt once, as {config.peer} does, and keep every later "
        "token; squeezekv cells keep evicting to their budget (see the KV-tokens table)"
    ]
    lines = [
        f"# squeezekv eval: {config.task}",
        "",
        f"- model: `{config.model}`",
        f"- samples complete in every cell: {len(samples)} of {total}",
        f"- headline metric: {task.metric} ({direction} is better); budgets are the mean KV tokens kept "
        "per layer as a fraction of the prompt (or whole tokens), equal for every allocator",
        *(peer_note if config.peer else []),
        *precision_note(config),
        "",
    ]
    if not summaries:
        return "\n".join([*lines, "No sample has finished in every cell yet.", ""])
    for name in summaries[0].metrics:
        lines += [
            f"### {name}",
            "",
            *table(config, summaries, lambda s, _, n=name: f"{s.metrics[n]:.4f}"),
            "",
        ]
    if task.relative:

        def ratio(summary: CellSummary, full: CellSummary) -> str:
            return f"{summary.metrics[task.metric] / full.metrics[task.metric]:.4f}"

        lines += [f"### {task.metric} / full-cache {task.metric}", "", *table(config, summaries, ratio), ""]
    if task.higher_is_better:
        lines += share_of_full(config, task, summaries, samples, records)
    lines += ["### KV tokens held per layer (mean, end of run)", ""]
    lines += [*table(config, summaries, lambda s, _: f"{s.kv_tokens:.1f}"), ""]
    sixteen = 16 in config.kv_bits  # a grid of fewer bits alone has no 16-bit cell to compare with
    baselines = [base for base in BASELINES if base in config.allocators] if sixteen else []
    for rank, base in enumerate(baselines):
        for allocator in config.allocators:
            if allocator not in baselines[: rank + 1]:
                ours = (allocator, allocator, 16)
                lines += versus(config, task, samples, records, ours, (base, base, 16))
    if config.equal_bytes:  # fewer bits, more tokens, against 16 bits at the same bytes
        for allocator in config.allocators if sixteen else ():
            if plans_bits(allocator):
                continue
            full_precision = (f"16-bit {allocator}", allocator, 16)
            for bits in config.kv_bits:
                if bits != 16:
                    quantized = (f"{bits}-bit {allocator}", allocator, bits)
                    lines += versus(config, task, samples, records, quantized, full_precision)
        if sixteen and (len(config.kv_bits) > 1 or any(plans_bits(a) for a in config.allocators)):
            lines += best_mix(config, task, summaries, samples, records)
    return "\n".join(lines)
