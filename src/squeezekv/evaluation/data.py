"""Reading evaluation inputs: JSONL files checked line by line, and the default held-out documents."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


def read_jsonl(
    path: str | Path, fields: dict[str, type | tuple[type, ...]], check: Callable[[dict], str | None] = None
) -> list[dict]:
    """Records of a JSONL file; a bad line is a ValueError naming the file, line and field.

    ``check`` may return a further problem with a record (``None`` when it is fine).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read data file {str(path)!r}: {error}") from None
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        for field, kind in fields.items():
            if field not in record:
                raise ValueError(f"{path}:{number}: missing field {field!r}")
            if not isinstance(record[field], kind):
                raise ValueError(f"{path}:{number}: field {field!r} has the wrong type")
        problem = check(record) if check is not None else None
        if problem:
            raise ValueError(f"{path}:{number}: {problem}")
        records.append(record)
    if not records:
        raise ValueError(f"data file {str(path)!r} holds no records")
    return records


def load_documents(path: str | None) -> list[dict]:
    """Documents (``id``, ``text``) from ``path``, or the reference model's long held-out split."""
    if path is not None:
        documents = read_jsonl(path, {"text": str})
        return [{"id": str(doc.get("id", index)), "text": doc["text"]} for index, doc in enumerate(documents)]
    try:
        from squeezekv.reference import load_heldout
    except ImportError:
        raise FileNotFoundError(
            "the bundled held-out data (squeezekv.reference) is not available; pass --data FILE.jsonl"
        ) from None
    return [{"id": str(doc["id"]), "text": doc["text"]} for doc in load_heldout("long")]
