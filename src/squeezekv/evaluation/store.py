"""The output directory: ``config.json``, the append-only ``results.jsonl`` and atomic rewrites.

A run appends one line per (sample, cell) and flushes it, so an interrupted run loses at most the
line being written; a rerun reads the file back and skips every pair already there. A line that
cannot be read (a damaged file) is moved to ``results.jsonl.bad`` and its pair is simply redone.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from squeezekv.evaluation.grid import EvalConfig, to_json

CONFIG, RESULTS, SET_ASIDE = "config.json", "results.jsonl", "results.jsonl.bad"


def write_atomic(path: Path, data: str | bytes) -> None:
    """Writes through a temporary file in the same directory and renames it over ``path``."""
    mode = "wb" if isinstance(data, bytes) else "w"
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.chmod(temporary, 0o644)  # mkstemp makes it private; results are meant to be read
    try:
        with os.fdopen(handle, mode) as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def read_config(path: Path) -> dict:
    """A stored run's ``config.json``; a damaged one is refused, named."""
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{path}: not a readable run configuration ({error}); fix it or choose another --out"
        ) from None
    if not isinstance(stored, dict):
        raise ValueError(f"{path}: not a run configuration (a JSON object); fix it or choose another --out")
    return stored


def extends(stored: object, wanted: object, name: str) -> bool:
    """Whether ``wanted`` only adds values to a grid axis of a stored run, so that the cells already
    measured keep their meaning and a rerun adds the new ones (a policy added to a finished grid
    costs only its own cells)."""
    stored = [] if stored is None and name in EvalConfig.AXES else stored  # an axis added since
    return (
        name in EvalConfig.AXES
        and isinstance(stored, list)
        and isinstance(wanted, list)
        and wanted[: len(stored)] == stored
    )


class ResultStore:
    """Results of one run directory, keyed by (sample id, cell key)."""

    def __init__(self, directory: str | Path, config: EvalConfig) -> None:
        self.directory = Path(directory)
        self.path = self.directory / RESULTS
        self.claim(config)
        self.records: dict[tuple[str, str], dict] = {}
        self.load()
        self.file = self.path.open("a", encoding="utf-8")

    def claim(self, config: EvalConfig) -> None:
        """Records ``config``, or refuses a directory that holds a run of another configuration."""
        config_path = self.directory / CONFIG
        if self.directory.exists() and not self.directory.is_dir():
            raise ValueError(f"--out {str(self.directory)!r} is a file, not a directory")
        if config_path.is_file():
            stored = read_config(config_path)
            wanted = config.identity()
            differing = sorted(
                name
                for name in wanted.keys() | stored.keys()
                if name not in EvalConfig.RUNTIME and stored.get(name) != wanted.get(name)
            )
            if any(not extends(stored.get(name), wanted.get(name), name) for name in differing):
                raise ValueError(
                    f"--out {str(self.directory)!r} holds a run with a different configuration "
                    f"(differs in: {', '.join(differing)}); choose another --out"
                )
            if differing:
                print(
                    f"{self.directory}: extending the stored run with more {', '.join(differing)}",
                    file=sys.stderr,
                )
        elif (self.directory / RESULTS).exists():
            raise ValueError(
                f"--out {str(self.directory)!r} holds results but no {CONFIG}; choose another --out"
            )
        self.directory.mkdir(parents=True, exist_ok=True)
        write_atomic(config_path, json.dumps(to_json(config), indent=2) + "\n")

    def load(self) -> None:
        """Reads the stored results; unreadable lines are set aside so that their pairs are redone."""
        if not self.path.exists():
            return
        text = self.path.read_text(encoding="utf-8", errors="replace")
        lines = text.split("\n")
        unfinished = lines.pop()  # "" unless a write was interrupted; that line is recomputed
        if unfinished:
            print(f"{self.path}: dropping an unfinished last line from an interrupted run", file=sys.stderr)
        kept, bad = [], []
        for number, line in enumerate(lines, start=1):
            if not line:
                continue
            try:
                record = json.loads(line)
                self.records[(record["sample"], record["cell"])] = record
                kept.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                bad.append(line)
                print(
                    f"{self.path}:{number}: not a results line; moved to {SET_ASIDE}, its result is redone",
                    file=sys.stderr,
                )
        if bad:
            with (self.directory / SET_ASIDE).open("a", encoding="utf-8") as file:
                file.write("".join(line + "\n" for line in bad))
        if bad or unfinished:
            write_atomic(self.path, "".join(line + "\n" for line in kept))

    def done(self, sample: str, cell: str) -> bool:
        return (sample, cell) in self.records

    def add(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        self.records[(record["sample"], record["cell"])] = record

    def close(self) -> None:
        self.file.close()
