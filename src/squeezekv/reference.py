"""Access to the bundled reference model and the offline held-out evaluation data.

Quality claims about KV-cache compression need a model with real long-range attention and long
documents it has never seen. Neither can be downloaded where this project is built and tested, so a
small Llama-architecture model (``models/squeeze-ref-25m``) and held-out documents
(``data/heldout_*.jsonl.xz``) ship with the repository; this module finds and loads them, and builds
the pass-key retrieval prompts used to test long-range recall.

Both are found under one folder, ``DATA_ROOT``: ``$SQUEEZEKV_HOME`` when set (an installed package,
or a copy of ``models/`` and ``data/`` elsewhere), otherwise the repository checkout this module
sits in. It is resolved once, at import.
"""

from __future__ import annotations

import json
import lzma
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

REFERENCE_MODEL = "squeeze-ref-25m"
HELDOUT_SPLITS = ("long", "short")
HOME_ENV = "SQUEEZEKV_HOME"
# src/squeezekv/reference.py -> the repository checkout (an editable install or a source tree)
DATA_ROOT = Path(os.environ.get(HOME_ENV) or Path(__file__).resolve().parents[2])

# The classic pass-key retrieval task: a key hidden at some depth inside repetitive filler.
PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about the important information there.\n"
)
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"


class _Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


def reference_model_path() -> Path:
    """Folder of the reference model (weights + tokenizer): ``DATA_ROOT/models/squeeze-ref-25m``."""
    path = DATA_ROOT / "models" / REFERENCE_MODEL
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"reference model not found at {path} (expected config.json there); point ${HOME_ENV} at "
            "a folder holding models/ and data/ as the repository does"
        )
    return path


def heldout_path(split: str) -> Path:
    """Path of a held-out split file: ``DATA_ROOT/data/heldout_<split>.jsonl.xz``."""
    if split not in HELDOUT_SPLITS:
        raise ValueError(f"unknown held-out split {split!r}; allowed: {', '.join(HELDOUT_SPLITS)}")
    path = DATA_ROOT / "data" / f"heldout_{split}.jsonl.xz"
    if not path.is_file():
        raise FileNotFoundError(
            f"held-out data not found at {path}; point ${HOME_ENV} at the repository, "
            "or rebuild it with scripts/build_corpus.py"
        )
    return path


def load_heldout(split: str) -> list[dict[str, Any]]:
    """Held-out documents (``id``, ``source``, ``text``) that the reference model never trained on.

    ``"long"``: documents of at least 8,192 tokens (for long-context evaluation);
    ``"short"``: documents of 1,024-4,096 tokens (for quick checks).
    """
    with lzma.open(heldout_path(split), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@dataclass(frozen=True)
class PasskeyPrompt:
    """A pass-key retrieval prompt; greedy decoding should continue ``prompt`` with ``answer``."""

    prompt: str
    answer: str
    key: str
    depth: float


def random_passkey(rng: random.Random, digits: int = 5) -> str:
    """A random key with exactly ``digits`` digits (no leading zero, so its length is unambiguous)."""
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def passkey_prompt(tokenizer: _Tokenizer, context_tokens: int, depth: float, key: str) -> PasskeyPrompt:
    """Build a prompt of about ``context_tokens`` tokens with ``key`` hidden at relative ``depth``.

    ``depth`` is in [0, 1]: 0 puts the key right after the introduction, 1 right before the question.
    The filler is repeated whole sentences, so the prompt length is exact to within one filler block.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    needle = PASSKEY_NEEDLE.format(key=key)

    def n_tokens(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    fixed = n_tokens(PASSKEY_INTRO + needle + PASSKEY_QUESTION) + 1  # + <s>
    per_block = n_tokens(PASSKEY_FILLER * 8) / 8
    blocks = max(0, int((context_tokens - fixed) / per_block))
    before = round(blocks * depth)
    prompt = PASSKEY_INTRO + PASSKEY_FILLER * before + needle + PASSKEY_FILLER * (blocks - before)
    return PasskeyPrompt(prompt=prompt + PASSKEY_QUESTION, answer=f" {key}.", key=key, depth=depth)
