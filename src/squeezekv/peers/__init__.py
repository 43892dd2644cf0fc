"""Peer libraries run in their own Python environment, on the same samples and budgets.

kvpress pins an older transformers, so it cannot share squeezekv's environment. A caller (``eval``
or ``bench``) writes its request to a JSON file, ``kvpress_runner.py`` runs with the peer's
interpreter, and one JSON line per finished job comes back. This module is the plumbing both share:
checking the peer's interpreter, the settings given to its presses, and running the script.
Anything missing on the peer's side is an error, never a skipped column.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from squeezekv.policies import SnapKV, Streaming

RUNNERS = {"kvpress": Path(__file__).with_name("kvpress_runner.py")}


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
