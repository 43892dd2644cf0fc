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


def load_documents(path: str | None, split: str = "long") -> list[dict]:
    """Documents (``id``, ``source``, ``text``) from ``path`` or a held-out split, sources interleaved.

    The order takes one document from each source in turn, so the first N documents (``--limit``,
    a batch) cover every source instead of the first source's files. A file's records without a
    ``source`` are grouped by the part of their ``id`` before the first ``/``.
    """
    if path is not None:
        records = read_jsonl(path, {"text": str})
        documents = [
            {"id": str(doc.get("id", index)), "source": doc.get("source"), "text": doc["text"]}
            for index, doc in enumerate(records)
        ]
    else:
        try:
            from squeezekv.reference import load_heldout
        except ImportError:
            raise FileNotFoundError(
                "the bundled held-out data (squeezekv.reference) is not available; pass --data FILE.jsonl"
            ) from None
        documents = [
            {"id": str(doc["id"]), "source": doc["source"], "text": doc["text"]}
            for doc in load_heldout(split)
        ]
    for document in documents:
        document["source"] = str(document["source"] or document["id"].split("/")[0])
    return interleaved(documents)


def interleaved(documents: list[dict]) -> list[dict]:
    """Round-robin over sources (in order of first appearance), each source's documents in file order."""
    by_source: dict[str, list[dict]] = {}
    for document in documents:
        by_source.setdefault(document["source"], []).append(document)
    queues = list(by_source.values())
    return [queue[rank] for rank in range(max(map(len, queues))) for queue in queues if rank < len(queue)]
