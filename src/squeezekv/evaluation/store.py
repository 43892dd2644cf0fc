"""The output directory: ``config.json``, the append-only ``results.jsonl`` and atomic rewrites.

A run appends one line per (sample, cell) and flushes it, so an interrupted run loses at most the
line being written; a rerun reads the file back and skips every pair already there.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from squeezekv.evaluation.grid import EvalConfig, to_json

CONFIG, RESULTS = "config.json", "results.jsonl"


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
            stored = json.loads(config_path.read_text(encoding="utf-8"))
            wanted = config.identity()
            differing = sorted(
                name
                for name in wanted.keys() | stored.keys()
                if name not in EvalConfig.RUNTIME and stored.get(name) != wanted.get(name)
            )
            if differing:
                raise ValueError(
                    f"--out {str(self.directory)!r} holds a run with a different configuration "
                    f"(differs in: {', '.join(differing)}); choose another --out"
                )
        elif (self.directory / RESULTS).exists():
            raise ValueError(
                f"--out {str(self.directory)!r} holds results but no {CONFIG}; choose another --out"
            )
        self.directory.mkdir(parents=True, exist_ok=True)
        write_atomic(config_path, json.dumps(to_json(config), indent=2) + "\n")

    def load(self) -> None:
        if not self.path.exists():
            return
        text = self.path.read_text(encoding="utf-8")
        lines = text.split("\n")
        if lines and lines[-1]:  # an interrupted write: drop the partial line, it is recomputed
            print(f"{self.path}: dropping an unfinished last line from an interrupted run", file=sys.stderr)
            write_atomic(self.path, "\n".join(lines[:-1]) + ("\n" if len(lines) > 1 else ""))
            lines = lines[:-1]
        for number, line in enumerate(lines, start=1):
            if not line:
                continue
            try:
                record = json.loads(line)
                self.records[(record["sample"], record["cell"])] = record
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{self.path}:{number}: not a results line; choose another --out") from None

    def done(self, sample: str, cell: str) -> bool:
        return (sample, cell) in self.records

    def add(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        self.records[(record["sample"], record["cell"])] = record

    def close(self) -> None:
        self.file.close()
