"""``eval``'s side of a peer library: its presses as eval cells, run through :mod:`squeezekv.peers`.

The request holds token ids, press and budget per job; ``eval`` scores the raw output with the same
code as its own cells.
"""

from __future__ import annotations

from collections.abc import Iterator

from squeezekv.evaluation.grid import Cell
from squeezekv.peers import check_peer, press_settings, run_runner

__all__ = ["PRESSES", "check_peer", "run_peer"]

PRESSES = {"kvpress": ("snapkv", "streaming", "pyramid", "observed")}


def run_peer(
    peer: str, python: str, model: str, device: str, dtype: str, jobs: list[tuple[str, Cell, dict]]
) -> Iterator[tuple[str, Cell, dict]]:
    """Runs ``(sample id, cell, job)`` triples; yields ``(sample id, cell, output)`` as lines arrive."""
    cells = {cell.key: cell for _, cell, _ in jobs}
    request = {
        "model": model,
        "device": device,
        "dtype": dtype,
        "settings": press_settings(),
        "jobs": [
            {"sample": sample, "cell": cell.key, "press": cell.policy, "budget": cell.budget, **job}
            for sample, cell, job in jobs
        ],
    }
    for output in run_runner(peer, python, request):
        yield output["sample"], cells[output["cell"]], output
