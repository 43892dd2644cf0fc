#!/usr/bin/env python3
"""Train the reference tokenizer, finalise the held-out sets and pack the tokenized training split.

Runs after ``scripts/build_corpus.py``. Held-out lengths are defined in tokens of *this* tokenizer,
so the final held-out files are written here:

* ``<model-dir>/tokenizer.json`` + ``tokenizer_config.json``: byte-level BPE (16k vocabulary) trained
  on the training split only; digits are split individually so that numbers (pass keys) are copied
  digit by digit. Loads with ``AutoTokenizer.from_pretrained(model_dir)``. With ``--reuse-tokenizer``
  the tokenizer already in ``<model-dir>`` is loaded instead of trained (and not rewritten), so the
  held-out files and the training stream can be rebuilt for an existing model.
* ``data/heldout_long.jsonl.xz``: held-out candidates with at least ``--long-min`` tokens.
* ``data/heldout_short.jsonl.xz``: held-out candidates with ``--short-min``..``--short-max`` tokens.
* ``<carry>/train.u16.xz`` + ``train_meta.json``: the training split as one uint16 token stream
  (documents shuffled deterministically, each as ``<s> ... </s>``), xz-compressed so that it fits
  into one transfer to the GPU machine.
* ``data/corpus_stats.json``: build statistics plus token counts per source.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
MODEL_MAX_LENGTH = 4096


def read_jsonl(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def build_tokenizer(texts: Iterator[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE with individually split digits and ``<s>`` prepended to every encoding."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\d"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return tok


def save_tokenizer(tok: Tokenizer, model_dir: Path) -> PreTrainedTokenizerFast:
    model_dir.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=MODEL_MAX_LENGTH
    )
    fast.save_pretrained(str(model_dir))
    return fast


def write_xz_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with lzma.open(tmp, "wt", encoding="utf-8", preset=9 | lzma.PRESET_EXTREME) as f:
        for r in rows:
            f.write(json.dumps({"id": r["id"], "source": r["source"], "text": r["text"]}, ensure_ascii=False))
            f.write("\n")
    os.replace(tmp, path)


def subset(docs: list[dict[str, str]], n: int) -> list[dict[str, str]]:
    """A deterministic pseudo-random subset of ``n`` documents (by SHA-1 of the id), in original order."""
    keep = set(sorted(range(len(docs)), key=lambda i: hashlib.sha1(docs[i]["id"].encode()).digest())[:n])
    return [d for i, d in enumerate(docs) if i in keep]


def token_lengths(tok: Tokenizer, texts: list[str]) -> list[int]:
    return [len(e.ids) - 1 for e in tok.encode_batch(texts)]  # without <s>


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("work/corpus"))
    parser.add_argument("--model-dir", type=Path, default=Path("models/squeeze-ref-25m"))
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--carry", type=Path, default=Path(".carry"), help="git-ignored, sent to the GPU")
    parser.add_argument("--vocab-size", type=int, default=16_384)
    parser.add_argument("--long-min", type=int, default=8_192)
    parser.add_argument("--short-min", type=int, default=1_024)
    parser.add_argument("--short-max", type=int, default=4_096)
    parser.add_argument("--max-long", type=int, default=260, help="keep at most this many long documents")
    parser.add_argument("--max-short", type=int, default=260, help="keep at most this many short documents")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--reuse-tokenizer",
        action="store_true",
        help="load <model-dir>/tokenizer.json instead of training a tokenizer (it is not rewritten)",
    )
    args = parser.parse_args()
    t0 = time.time()

    train = read_jsonl(args.work / "train.jsonl")
    if args.reuse_tokenizer:
        tok = Tokenizer.from_file(str(args.model_dir / "tokenizer.json"))
        print(f"tokenizer loaded from {args.model_dir} ({tok.get_vocab_size()} entries)", flush=True)
    else:
        tok = build_tokenizer((d["text"] for d in train), args.vocab_size)
        save_tokenizer(tok, args.model_dir)
        print(f"tokenizer trained on {len(train)} docs in {time.time() - t0:.0f}s", flush=True)

    args.data_dir.mkdir(parents=True, exist_ok=True)
    long_c = read_jsonl(args.work / "heldout_long_candidates.jsonl")
    short_c = read_jsonl(args.work / "heldout_short_candidates.jsonl")
    long_n = token_lengths(tok, [d["text"] for d in long_c])
    short_n = token_lengths(tok, [d["text"] for d in short_c])
    long_docs = [d for d, n in zip(long_c, long_n, strict=True) if n >= args.long_min]
    long_docs = subset(long_docs, args.max_long)
    short_docs = [d for d, n in zip(short_c, short_n, strict=True) if args.short_min <= n <= args.short_max]
    short_docs = subset(short_docs, args.max_short)
    write_xz_jsonl(args.data_dir / "heldout_long.jsonl.xz", long_docs)
    write_xz_jsonl(args.data_dir / "heldout_short.jsonl.xz", short_docs)
    print(f"held out: {len(long_docs)} long, {len(short_docs)} short", flush=True)

    # Training stream: deterministic document shuffle, <s> doc </s> per document.
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    order = np.random.default_rng(args.seed).permutation(len(train))
    encoded = tok.encode_batch([train[i]["text"] for i in order], add_special_tokens=False)
    per_source: dict[str, int] = {}
    chunks = []
    for i, enc in zip(order, encoded, strict=True):
        per_source[train[i]["source"]] = per_source.get(train[i]["source"], 0) + len(enc.ids) + 2
        chunks.append(np.asarray([bos, *enc.ids, eos], dtype=np.uint16))
    stream = np.concatenate(chunks)
    args.carry.mkdir(parents=True, exist_ok=True)
    raw = args.carry / "train.u16"
    stream.tofile(raw)
    subprocess.run(["xz", "-9", "-T0", "-f", str(raw)], check=True)  # -> train.u16.xz, atomically by xz
    meta = {
        "tokens": int(stream.size),
        "vocab_size": tok.get_vocab_size(),
        "bos_token_id": bos,
        "eos_token_id": eos,
        "dtype": "uint16",
    }
    (args.carry / "train_meta.json").write_text(json.dumps(meta, indent=2) + "\n")

    stats = json.loads((args.work / "stats.json").read_text())
    for name, s in stats["sources"].items():
        s["train_tokens"] = per_source.get(name, 0)
        s["heldout_long"] = sum(d["source"] == name for d in long_docs)
        s["heldout_short"] = sum(d["source"] == name for d in short_docs)
    stats["train_tokens"] = int(stream.size)
    stats["vocab_size"] = tok.get_vocab_size()
    stats["heldout_long_docs"] = len(long_docs)
    kept = {d["id"] for d in long_docs}
    stats["heldout_long_tokens_median"] = int(
        np.median([n for d, n in zip(long_c, long_n, strict=True) if d["id"] in kept])
    )
    stats["heldout_short_docs"] = len(short_docs)
    stats["carry_bytes"] = (args.carry / "train.u16.xz").stat().st_size
    tmp = args.data_dir / "corpus_stats.json.tmp"
    tmp.write_text(json.dumps(stats, indent=2) + "\n")
    os.replace(tmp, args.data_dir / "corpus_stats.json")
    mib = stats["carry_bytes"] / 2**20
    print(f"train stream: {stream.size / 1e6:.1f}M tokens, {mib:.1f} MiB xz", flush=True)
    print(f"done in {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
