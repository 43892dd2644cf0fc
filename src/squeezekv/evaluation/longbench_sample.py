"""Builds the small synthetic LongBench-format file shipped as ``data/longbench_sample.jsonl``.

Every record is made from held-out documents, and its answer is recoverable from its context, so
the whole LongBench path (templates, truncation, each metric family) can be exercised offline:
QA on an inserted reference number, retrieval of the paragraph a sentence comes from, counting
distinct paragraphs, classifying a passage's source, next-line completion of a code block, and a
one-sentence summary scored with ROUGE-L. Run: ``python -m squeezekv.evaluation.longbench_sample OUT``.
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

CONTEXT_CHARS = 3000


def paragraphs(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", text) if len(p.strip()) > 200]


def sentences(text: str) -> list[str]:
    return [
        s.strip() for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if 40 < len(s.strip()) < 200
    ]


def qa(doc: dict, rng: random.Random) -> dict:
    number = str(rng.randint(1000, 9999))
    text = doc["text"][:CONTEXT_CHARS]
    cut = rng.randint(len(text) // 4, 3 * len(text) // 4)
    context = f"{text[:cut]}\nThe reference number of this document is {number}.\n{text[cut:]}"
    question = "What is the reference number of this document?"
    return {"dataset": "multifieldqa_en", "context": context, "input": question, "answers": [number]}


def retrieval(docs: list[dict], rng: random.Random) -> dict:
    chosen = [paragraphs(doc["text"])[0][:600] for doc in docs]
    target = rng.randrange(len(chosen))
    context = "\n\n".join(f"Paragraph {i + 1}: {p}" for i, p in enumerate(chosen))
    abstract = max(sentences(chosen[target]) or [chosen[target][:150]], key=len)
    answer = f"Paragraph {target + 1}"
    return {"dataset": "passage_retrieval_en", "context": context, "input": abstract, "answers": [answer]}


def count(docs: list[dict], rng: random.Random) -> dict:
    distinct = [paragraphs(doc["text"])[0][:400] for doc in docs]
    shown = distinct + [rng.choice(distinct) for _ in range(len(distinct) // 2)]
    rng.shuffle(shown)
    context = "\n\n".join(f"Paragraph {i + 1}: {p}" for i, p in enumerate(shown))
    return {"dataset": "passage_count", "context": context, "input": "", "answers": [str(len(distinct))]}


def classify(docs: list[dict], rng: random.Random) -> dict:
    examples = [(sentences(doc["text"])[0], doc["source"]) for doc in docs]
    (query, label), shots = examples[0], examples[1:]
    context = "\n".join(f"Passage: {text}\nSource: {source}\n" for text, source in shots)
    classes = sorted({source for _, source in examples})
    return {
        "dataset": "trec",
        "context": context,
        "input": f"Passage: {query}\nSource:",
        "answers": [label],
        "all_classes": classes,
    }


def code(doc: dict) -> dict | None:
    """The doc up to the last line (the answer) of its first code-like indented block of >= 4 lines."""
    lines = doc["text"].split("\n")
    for start in range(len(lines)):
        block = 0
        while (
            start + block < len(lines)
            and lines[start + block].startswith("    ")
            and lines[start + block].strip()
        ):
            block += 1
        end = start + block - 1
        if block >= 4 and re.search(r"\w\s*[(=]", lines[end]):
            context = "\n".join(lines[:end])[-CONTEXT_CHARS:] + "\n"
            return {"dataset": "lcc", "context": context, "input": "", "answers": [lines[end].strip()]}
    return None


def summary(doc: dict) -> dict:
    first = sentences(doc["text"])[0]
    return {"dataset": "xsum", "context": doc["text"][:CONTEXT_CHARS], "input": "", "answers": [first]}


def build(docs: list[dict], seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    usable = [d for d in docs if len(paragraphs(d["text"])) >= 2 and sentences(d["text"])]
    rng.shuffle(usable)
    by_source = {}
    for doc in usable:
        by_source.setdefault(doc["source"], doc)
    coded = next(record for record in map(code, usable) if record is not None)
    records = [
        qa(usable[0], rng),
        qa(usable[1], rng),
        retrieval(usable[2:7], rng),
        retrieval(usable[7:12], rng),
        count(usable[12:16], rng),
        classify(list(by_source.values())[:6], rng),
        coded,
        summary(usable[16]),
    ]
    return [{"_id": f"sample-{i}", **record} for i, record in enumerate(records)]


def main(argv: list[str]) -> None:
    from squeezekv.reference import load_heldout

    out = Path(argv[0] if argv else "data/longbench_sample.jsonl")
    out.write_text("".join(json.dumps(r) + "\n" for r in build(load_heldout("short"))), encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1:])
