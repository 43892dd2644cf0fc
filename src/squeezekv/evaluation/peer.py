"""Peer libraries run in their own Python environment, on the same samples and budgets.

kvpress pins an older transformers, so it cannot share squeezekv's environment. The caller's request
(for ``eval``: token ids, press, budget per job; for ``bench``: the model's shape and the batches)
goes to a JSON file, ``kvpress_runner.py`` runs with the peer's interpreter, and one JSON line per
finished job comes back; ``eval`` scores the raw output with the same code as its own cells.
Anything missing on the peer's side is an error, never a skipped column.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from squeezekv.evaluation.grid import Cell
from squeezekv.policies import SnapKV, Streaming

RUNNERS = {"kvpress": Path(__file__).with_name("kvpress_runner.py")}
PRESSES = {"kvpress": ("snapkv", "streaming", "pyramid", "observed")}
# the bench sizes a press's batch from its kept tokens, the same in every layer for these (PyramidKV
# varies them per layer; observed attention needs eager attention, the whole score matrix per layer)
BENCH_PRESSES = {"kvpress": ("streaming", "snapkv")}


def check_peer(peer: str, python: str | None) -> None:
    """Fails with what is missing unless ``python`` can import the peer library."""
    if peer not in RUNNERS:
        raise ValueError(f"unknown peer {peer!r}; choose one of {sorted(RUNNERS)}")
    if python is None:
        raise ValueError(
            f"--peer {peer} needs --peer-python: the Python of an environment with {peer} installed"
        )
    if not Path(python).is_file():
        raise FileNotFoundError(f"--peer-python {python!r} does not exist")
    probe = subprocess.run(
        [python, "-c", f"import {peer}, transformers; print(transformers.__version__)"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        raise ValueError(
            f"--peer-python {python!r} cannot import {peer} ({last}); install it there with "
            f"pip install 'transformers<5.3' {peer}"
        )


def press_settings() -> dict:
    """squeezekv's default observation window, kernel and sink count, given to the peer's presses so
    that its SnapKV, PyramidKV and StreamingLLM differ from ours in implementation, not in settings."""
    snapkv = SnapKV()
    return {"window": snapkv.window, "kernel": snapkv.kernel, "sinks": Streaming().sinks}


def run_runner(peer: str, python: str, request: dict) -> Iterator[dict]:
    """Runs the peer's runner script on ``request`` with ``python``; yields its JSON lines as they arrive.

    Raises ``ValueError`` with the runner's last line of stderr if it exits with an error (after the
    lines it printed before failing have been yielded).
    """
    with tempfile.TemporaryDirectory(prefix="squeezekv-peer-") as folder:
        request_path, script = Path(folder) / "request.json", Path(folder) / RUNNERS[peer].name
        request_path.write_text(json.dumps(request), encoding="utf-8")
        # a copy, alone in its folder: the script's folder is first on the peer's sys.path
        shutil.copyfile(RUNNERS[peer], script)
        errors = Path(folder) / "stderr.log"  # a file, not a pipe: a chatty runner must never block
        with errors.open("w") as error_file:
            process = subprocess.Popen(
                [python, str(script), str(request_path)], stdout=subprocess.PIPE, stderr=error_file, text=True
            )
            for line in process.stdout:
                yield json.loads(line)
            returncode = process.wait()
        if returncode != 0:
            last = (errors.read_text().strip().splitlines() or ["no output"])[-1]
            raise ValueError(f"the {peer} runner failed: {last}")


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
