"""PNG figures for a run: metric vs budget, per-layer profile, passkey heat maps.

matplotlib runs on its non-interactive backend, so plotting works without a display.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from squeezekv.evaluation.grid import FULL  # noqa: E402


def metric_vs_budget(summaries, budgets, metric: str, path: Path) -> None:
    """One line per policy × allocator (and peer press); the full cache as a horizontal line.

    Colour tells the policy (or peer press), line style the allocator.
    """
    figure, axes = plt.subplots(figsize=(7, 4.5))
    rows: dict[str, list[tuple[float, float]]] = {}
    styles: dict[str, tuple[str, str]] = {}
    colours = plt.get_cmap("tab10").colors
    families: list[str] = []
    for summary in summaries:
        cell = summary.cell
        if cell.budget is None:  # the full cache, or transformers' QuantizedCache: one value at every budget
            full = cell.method == FULL
            axes.axhline(
                summary.metrics[metric], color="black" if full else "grey", linestyle="--" if full else ":",
                label=cell.row,
            )  # fmt: skip
            continue
        family = f"{cell.method}:{cell.policy}"
        families += [family] if family not in families else []
        dash = {"squeeze": "-", "uniform": "--", "pyramid": ":"}.get(cell.allocator, "-.")
        styles[cell.row] = (colours[families.index(family) % len(colours)], dash)
        rows.setdefault(cell.row, []).append((cell.budget, summary.metrics[metric]))
    for row, points in rows.items():
        points = sorted(points, key=lambda point: budgets.index(point[0]))
        colour, dash = styles[row]
        axes.plot(*zip(*points, strict=True), dash, color=colour, marker="o", label=row)
    axes.set_xlabel("budget (KV kept per layer, mean)")
    axes.set_ylabel(metric)
    axes.legend(fontsize=6, ncol=2)
    axes.grid(alpha=0.3)
    save(figure, path)


def layer_profile(
    similarity: list[float], budgets: dict[str, list[int]], squeezed: list[bool], path: Path
) -> None:
    """Per-layer similarity (squeezed layers marked) above the budget each allocator gives.

    The figure widens with the layer count, so every layer of a 30-layer model keeps a labelled tick.
    """
    layers = list(range(len(similarity)))
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(max(7.0, 0.28 * len(layers)), 6), sharex=True)
    top.plot(layers, similarity, marker="o", color="tab:blue")
    marked = [layer for layer in layers if squeezed[layer]]
    top.scatter(
        marked,
        [similarity[i] for i in marked],
        s=90,
        facecolors="none",
        edgecolors="red",
        label="squeezed group",
    )
    top.set_ylabel("cos(residual, residual + attention)")
    top.legend(fontsize=8)
    top.grid(alpha=0.3)
    width = 0.8 / max(1, len(budgets))
    for index, (allocator, values) in enumerate(budgets.items()):
        bottom.bar([layer + index * width for layer in layers], values, width=width, label=allocator)
    bottom.set_xticks(layers)
    bottom.tick_params(axis="x", labelsize=7)
    bottom.set_xlabel("layer")
    bottom.set_ylabel("budget (tokens)")
    bottom.legend(fontsize=8)
    save(figure, path)


def heat_map(grid: list[list[float]], rows: list, columns: list, title: str, path: Path) -> None:
    """``grid[r][c]`` as a colour map: rows are depths, columns lengths (for passkey)."""
    figure, axes = plt.subplots(figsize=(1.2 * len(columns) + 2, 0.5 * len(rows) + 1.5))
    image = axes.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    axes.set_xticks(range(len(columns)), [str(c) for c in columns])
    axes.set_yticks(range(len(rows)), [f"{r:g}" for r in rows])
    axes.set_xlabel("context length (tokens)")
    axes.set_ylabel("key depth")
    axes.set_title(title, fontsize=9)
    figure.colorbar(image, ax=axes, label="accuracy")
    save(figure, path)


def save(figure, path: Path) -> None:
    figure.tight_layout()
    temporary = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(temporary, dpi=110)
    plt.close(figure)
    temporary.replace(path)


def grouping_stability(mean_similarity: list[float], frequency: list[float], path: Path) -> None:
    """Mean per-layer similarity over prompts, and how often each layer was squeezed."""
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    layers = list(range(len(frequency)))
    top.plot(layers, mean_similarity, marker="o")
    top.set_ylabel("mean similarity")
    top.grid(alpha=0.3)
    bottom.bar(layers, frequency, color="tab:red")
    bottom.set_ylim(0, 1)
    bottom.set_xlabel("layer")
    bottom.set_ylabel("share of prompts squeezed")
    save(figure, path)
