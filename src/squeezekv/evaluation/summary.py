"""Turning results into per-cell aggregates and the ``summary.md`` tables.

Only samples finished in every cell are aggregated, so all cells of a table compare the same
samples, also for a partial run.
"""

from __future__ import annotations

from dataclasses import dataclass

from squeezekv.evaluation.grid import FULL, Cell, EvalConfig
from squeezekv.evaluation.tasks import Task


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
    """Markdown rows: one per policy × allocator (and peer press), one column per budget."""
    by_key = {(s.cell.row, s.cell.budget): s for s in summaries if s.cell.method != FULL}
    full = next(s for s in summaries if s.cell.method == FULL)
    rows = list(dict.fromkeys(s.cell.row for s in summaries if s.cell.method != FULL))
    lines = [
        "| | " + " | ".join(f"budget {b}" for b in config.budgets) + " |",
        "|---|" + "---:|" * len(config.budgets),
        f"| full cache | {' | '.join(value(full, full) for _ in config.budgets)} |",
    ]
    for row in rows:
        cells = [by_key.get((row, budget)) for budget in config.budgets]
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


def squeeze_gain(config: EvalConfig, task: Task, summaries: list[CellSummary]) -> list[str]:
    """Relative change of the headline metric from ``uniform`` to ``squeeze`` (positive = better)."""
    if not {"uniform", "squeeze"} <= set(config.allocators):
        return []
    found = {(s.cell.policy, s.cell.allocator, s.cell.budget): s.metrics[task.metric] for s in summaries}
    sign = 1.0 if task.higher_is_better else -1.0

    def change(policy: str, budget) -> str:
        uniform, squeeze = found[(policy, "uniform", budget)], found[(policy, "squeeze", budget)]
        return f"{100 * sign * (squeeze - uniform) / abs(uniform):+.2f}" if uniform else "n/a"

    title = f"squeeze vs uniform at equal memory: change of {task.metric} in % (positive: squeeze better)"
    return policy_budget_table(title, config, change)


def squeeze_wins(config: EvalConfig, task: Task, samples: list[str], records: dict) -> list[str]:
    """Per policy and budget: on how many samples ``squeeze`` strictly beats ``uniform`` (paired)."""
    if not {"uniform", "squeeze"} <= set(config.allocators):
        return []
    sign = 1.0 if task.higher_is_better else -1.0

    def value(sample: str, policy: str, allocator: str, budget) -> float:
        return sign * records[(sample, f"{policy}/{allocator}/{budget}")]["metrics"][task.metric]

    def wins(policy: str, budget) -> str:
        better = [value(s, policy, "squeeze", budget) > value(s, policy, "uniform", budget) for s in samples]
        return str(sum(better))

    title = f"samples on which squeeze beats uniform (per-sample {task.metric}, of {len(samples)})"
    return policy_budget_table(title, config, wins)


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
    lines += ["### KV tokens held per layer (mean, end of run)", ""]
    lines += [*table(config, summaries, lambda s, _: f"{s.kv_tokens:.1f}"), ""]
    gain = squeeze_gain(config, task, summaries)
    if gain:
        lines += [*gain, "", *squeeze_wins(config, task, samples, records), ""]
    return "\n".join(lines)
