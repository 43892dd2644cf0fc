#!/usr/bin/env python3
"""Train the squeezekv reference model (``LlamaForCausalLM``) on the packed training token stream.

The model is trained for a fixed wall-clock budget, because the GPU machine is lent for a few minutes
at a time: the learning rate follows a warmup-stable-decay schedule whose decay phase is placed on
the elapsed *time* (last ``--decay-fraction`` of the budget), so the run always ends fully decayed
whatever the throughput turns out to be. Training uses bf16 autocast with fp32 master weights.

A small share of the training sequences start with a synthetic retrieval document, which teaches the
small model to look far back: mostly pass-key documents of half to a full window by default (2k-4k
tokens; the bundled model's last stage used 0.9 to 1 window), in the evaluation's template, half in
its repetitive filler and half with the key in natural text, the rest shorter key-value documents
(``--passkey-share``, ``--passkey-min-len`` ... ``--kv-max-len``). A sequence starts with one with
probability ``--synthetic-prob`` (``--synthetic-decay-prob`` during the learning-rate decay, if
set), and a hard cap (``--synthetic-max-fraction``, default 2%) skips any insertion that would push
the running share of synthetic tokens above it. ``--answer-loss-weight`` counts the answers of those
documents (the key after the question and its full stop) that many times in the loss, adding no
tokens. ``--simulate-steps N`` only builds the pool and reports what N steps would insert. After
training the model is cast to bf16 and saved in shards of at most 15 MB together with the tokenizer,
then evaluated (held-out perplexity by position bucket, pass-key accuracy); ``train_report.json`` and
``loss_curve.png`` are written next to it.

GPU run:   python scripts/train_model.py --data .carry/train.u16.xz --out out/m --compile
Continue:  add --init-from models/squeeze-ref-25m (weights only; see the model card for each stage)
CPU smoke: python scripts/train_model.py --data .carry/train.u16.xz --out out/m --device cpu --tiny \
               --seq-len 256 --batch-size 2 --steps 3 --warmup-steps 1 --synthetic-pool 4 \
               --synthetic-prob 0.5 --synthetic-max-fraction 1 --eval-trials 1 --eval-max-docs 2
Simulate:  python scripts/train_model.py --data .carry/train.u16.xz --out out/m --simulate-steps 2145 \
               --seed 6 --passkey-min-len 0.9 --passkey-depth-power 2 --passkey-share 1.0
               (the bundled model's last stage)
(the test suite runs the smoke path too: tests/test_reference.py::test_training_smoke_cpu)
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

sys.path.insert(0, str(Path(__file__).resolve().parent))
import eval_reference  # noqa: E402  (sibling script; imports squeezekv/reference.py by path)

reference = eval_reference.reference


def _f(default: Any, help: str) -> Any:
    """A config field with its command-line help text."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved with the report so a run can be repeated.

    Every field is also a command-line flag (``synthetic_prob`` -> ``--synthetic-prob``); lengths of
    synthetic documents are fractions of the training window (``seq_len + 1`` tokens), so that the same
    settings work for the 4,096-token GPU run and the 128-token CPU smoke test.
    """

    data: str
    tokenizer_dir: str
    out: str
    device: str = _f("cuda", "torch device")
    tiny: bool = _f(False, "2-layer, 64-wide model for smoke tests (not the reference architecture)")
    seq_len: int = _f(4096, "training window in tokens")
    batch_size: int = _f(16, "sequences per step")
    lr: float = _f(1.5e-3, "peak learning rate")
    min_lr_ratio: float = _f(0.0, "final learning rate as a fraction of --lr")
    warmup_steps: int = _f(300, "linear warmup steps")
    weight_decay: float = _f(0.1, "AdamW weight decay on matrices")
    grad_clip: float = _f(1.0, "gradient norm clipping")
    time_budget_s: float = _f(450.0, "wall-clock training time; the schedule decays over its end")
    steps: int = _f(0, "> 0: stop after this many steps and decay over steps instead of time")
    decay_fraction: float = _f(0.25, "learning-rate decay over the last fraction of the run")
    synthetic_prob: float = _f(
        0.03, "probability that a training sequence starts with a synthetic retrieval document"
    )
    synthetic_decay_prob: float = _f(
        0.0,
        "> 0: the probability used instead of --synthetic-prob during the learning-rate decay phase, so "
        "that retrieval documents gather where the model settles (the cap still holds over the run)",
    )
    synthetic_max_fraction: float = _f(
        0.02,
        "hard cap on synthetic tokens / training tokens: a synthetic document that would push the running "
        "fraction above it is not inserted (it waits for a later sequence)",
    )
    synthetic_pool: int = _f(
        1500, "synthetic documents built before training; used in order, repeating only when exhausted"
    )
    passkey_share: float = _f(0.85, "share of pass-key documents among synthetic documents (rest: key-value)")
    passkey_min_len: float = _f(0.5, "shortest pass-key document, as a fraction of the window")
    passkey_max_len: float = _f(1.0, "longest pass-key document, as a fraction of the window")
    passkey_depth_power: float = _f(
        1.0,
        "a key's depth in its document is u ** power for uniform u: 1 is uniform, > 1 puts more keys "
        "early, far from the question",
    )
    passkey_filler_share: float = _f(
        0.5,
        "share of pass-key documents in the evaluation's repetitive filler (rest: key in natural text)",
    )
    answer_loss_weight: float = _f(
        1.0,
        "loss weight of the answer tokens of synthetic documents (the key after the question and the "
        "full stop that ends it), relative to every other token; > 1 puts more of the training signal "
        "on retrieval without adding tokens",
    )
    kv_min_len: float = _f(0.125, "shortest key-value document, as a fraction of the window")
    kv_max_len: float = _f(0.5, "longest key-value document, as a fraction of the window")
    init_from: str = _f("", "continue from a saved model (weights only; optimizer and schedule restart)")
    max_tokens: int = _f(0, "> 0: use only this many tokens of the stream (tests)")
    compile: bool = _f(False, "torch.compile the model (falls back to eager if compilation fails)")
    log_every: int = _f(10, "log the loss every this many steps")
    seed: int = _f(0, "seed of data order, synthetic documents and initialisation")
    eval_trials: int = _f(50, "pass-key prompts per length in the final evaluation")
    eval_max_docs: int = _f(0, "> 0: evaluate perplexity on only this many held-out documents")
    skip_eval: bool = _f(False, "skip the final evaluation")

    def __post_init__(self) -> None:
        if not self.answer_loss_weight > 0:
            raise ValueError(
                f"--answer-loss-weight {self.answer_loss_weight} must be > 0 (1: answers weigh as any token)"
            )


def model_config(vocab_size: int, bos: int, eos: int, pad: int, tiny: bool = False) -> LlamaConfig:
    """The reference architecture: 16 layers, GQA 8/2 heads, SwiGLU, RoPE, RMSNorm, tied embeddings."""
    dims = (
        {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
        if tiny
        else {"hidden_size": 320, "intermediate_size": 832, "num_hidden_layers": 16}
    )
    return LlamaConfig(
        vocab_size=vocab_size,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=10_000.0,
        tie_word_embeddings=True,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        hidden_act="silu",
        initializer_range=0.02,
        attn_implementation="sdpa",
        **dims,
    )


def load_stream(path: str, max_tokens: int = 0) -> np.ndarray:
    """The uint16 token stream, from ``.u16`` or ``.u16.xz``."""
    if path.endswith(".xz"):
        with lzma.open(path, "rb") as f:
            data = f.read(2 * max_tokens if max_tokens else -1)
        stream = np.frombuffer(data, dtype=np.uint16)
    else:
        stream = np.fromfile(path, dtype=np.uint16, count=max_tokens or -1)
    return stream[:max_tokens] if max_tokens else stream


# --------------------------------------------------------------------------- synthetic retrieval documents

NAMES = "ABCDEFGHJKLMNPQRSTUVWXYZ"
REPORT = "train_report.json"
Span = tuple[int, int]  # characters [start, end) of an answer in a document's text


@dataclass(frozen=True)
class SyntheticDoc:
    """A tokenized synthetic document; ``answers`` index the tokens of ``ids`` that answer its questions."""

    kind: str
    ids: list[int]
    answers: list[int]


class SyntheticDocs:
    """Pass-key and key-value retrieval documents, as token ids, built from real or repetitive filler.

    The pass-key documents use the evaluation template (``squeezekv.reference.passkey_prompt``) with
    keys of 3-7 digits; a share of them (``filler_share``) use the evaluation's repetitive filler, the
    others hide the key in natural training text. The key-value documents ask several questions each,
    so one sequence carries several retrieval targets. Lengths are drawn uniformly from a range given
    as fractions of the window, separately for the two kinds. Each document knows where its answers
    are (character spans of the text, then token indices), so that training can weight them.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        stream: np.ndarray,
        rng: random.Random,
        passkey_share: float = 0.85,
        passkey_len: tuple[float, float] = (0.5, 1.0),
        filler_share: float = 0.5,
        kv_len: tuple[float, float] = (0.125, 0.5),
        depth_power: float = 1.0,
    ) -> None:
        self.tok = tokenizer
        self.stream = stream
        self.rng = rng
        self.passkey_share = passkey_share
        self.passkey_len = passkey_len
        self.filler_share = filler_share
        self.kv_len = kv_len
        if not depth_power > 0:
            raise ValueError(f"--passkey-depth-power {depth_power} must be > 0 (1: uniform depths)")
        self.depth_power = depth_power

    def _natural_text(self, n_tokens: int) -> str:
        start = self.rng.randrange(0, max(1, len(self.stream) - n_tokens))
        return self.tok.decode(self.stream[start : start + n_tokens].tolist(), skip_special_tokens=True)

    def _insert(self, text: str, sentences: list[str], depth_power: float = 1.0) -> str:
        """Insert sentences at random whitespace positions, in order, each at depth ``u ** depth_power``."""
        cuts = [self.rng.randrange(0, len(text) + 1) for _ in sentences]
        if depth_power != 1:  # skewed only when asked, so that uniform runs draw exactly as before
            cuts = [round(len(text) * (cut / max(len(text), 1)) ** depth_power) for cut in cuts]
        cuts.sort()
        out, prev = [], 0
        for cut, s in zip(cuts, sentences, strict=True):
            sp = text.rfind(" ", 0, cut) + 1 if cut else 0
            sp = max(sp, prev)
            out += [text[prev:sp], s, " "]
            prev = sp
        out.append(text[prev:])
        return "".join(out)

    def passkey(self, n_tokens: int) -> tuple[str, str, list[Span]]:
        """(kind, text, answer spans): kind ``passkey_filler`` (the evaluation's filler) or
        ``passkey_text`` (natural text); the answer is the key after the question and its full stop."""
        key = reference.random_passkey(self.rng, digits=self.rng.randint(3, 7))
        depth = self.rng.random() ** self.depth_power
        if self.rng.random() < self.filler_share:
            p = reference.passkey_prompt(self.tok, n_tokens, depth=depth, key=key)
            kind, text = "passkey_filler", p.prompt + p.answer
        else:
            needle = reference.PASSKEY_NEEDLE.format(key=key)
            filler = self._natural_text(max(16, n_tokens - 80))
            body = self._insert(filler, [needle], self.depth_power)
            kind = "passkey_text"
            text = reference.PASSKEY_INTRO + body + reference.PASSKEY_QUESTION + f" {key}."
        start = text.rindex(key)
        return kind, text, [(start, start + len(key) + 1)]  # the key and the full stop that ends it

    def key_values(self, n_tokens: int) -> tuple[str, list[Span]]:
        """(text, answer spans): facts in natural text, then questions, each answered by its number (and
        full stop)."""
        n_pairs = self.rng.randint(2, max(2, min(24, n_tokens // 150)))  # facts fill <= ~10% of it
        names = self.rng.sample([a + b + c for a in NAMES for b in NAMES for c in NAMES[:8]], n_pairs)
        values = [str(self.rng.randrange(10_000, 100_000)) for _ in names]
        facts = [f"The number for {k} is {v}." for k, v in zip(names, values, strict=True)]
        filler = self._natural_text(max(16, n_tokens - 20 * n_pairs))
        text = self._insert(filler, facts) + "\n"
        spans = []
        for i in self.rng.sample(range(n_pairs), self.rng.randint(1, min(8, n_pairs))):
            text += f"\nWhat is the number for {names[i]}? It is "
            spans.append((len(text), len(text) + len(values[i]) + 1))
            text += f"{values[i]}."
        return text, spans

    def _length(self, max_tokens: int, span: tuple[float, float]) -> int:
        hi = max(1, min(int(max_tokens * span[1]), max_tokens) - 32)  # room for the tokenizer's slack
        return self.rng.randint(min(int(max_tokens * span[0]), hi), hi)

    def sample(self, max_tokens: int) -> SyntheticDoc:
        """One document of at most ``max_tokens`` tokens (``<s> ... </s>``)."""
        while True:
            if self.rng.random() < self.passkey_share:
                kind, text, spans = self.passkey(self._length(max_tokens, self.passkey_len))
            else:
                kind = "kv"
                text, spans = self.key_values(self._length(max_tokens, self.kv_len))
            enc = self.tok(text, add_special_tokens=True, return_offsets_mapping=True)
            ids = enc["input_ids"] + [self.tok.eos_token_id]
            if len(ids) <= max_tokens:
                answers = [
                    i
                    for i, (lo, hi) in enumerate(enc["offset_mapping"])
                    if hi > lo and any(lo < end and hi > start for start, end in spans)
                ]
                return SyntheticDoc(kind, ids, answers)


class SyntheticMix:
    """Decides which training sequences start with a synthetic document, under a hard token cap.

    Each sequence starts with the next document of the pool with probability ``prob``; a document is
    only inserted if the synthetic tokens stay at most ``max_fraction`` of the tokens trained once this
    step is done, otherwise the sequence stays natural and the document waits for a later one. The
    measured fraction therefore never exceeds the cap. Documents are used in pool order, so none is
    repeated before the pool is exhausted. The same object drives training and ``--simulate-steps``.
    """

    LENGTH_BUCKETS = ((0, 1024), (1024, 2048), (2048, 3072), (3072, 1 << 30))

    def __init__(
        self, pool: list[SyntheticDoc], rng: random.Random, prob: float, max_fraction: float
    ) -> None:
        self.pool = pool
        self.rng = rng
        self.prob = prob
        self.max_fraction = max_fraction
        self.next = 0
        self.synthetic_tokens = 0
        self.answer_tokens = 0
        self.tokens = 0
        self.inserted: dict[str, list[int]] = {}  # kind -> counts per LENGTH_BUCKETS
        self.skipped = 0

    def plan(self, batch_size: int, seq_len: int) -> list[tuple[int, SyntheticDoc]]:
        """(row, document) pairs for one step; accounts the step's ``batch_size * seq_len`` tokens."""
        self.tokens += batch_size * seq_len
        out = []
        for row in range(batch_size):
            if not self.pool or self.rng.random() >= self.prob:
                continue
            doc = self.pool[self.next % len(self.pool)]
            n = len(doc.ids)
            if self.synthetic_tokens + n > self.max_fraction * self.tokens:
                self.skipped += 1
                continue
            self.next += 1
            self.synthetic_tokens += n
            self.answer_tokens += len(doc.answers)
            counts = self.inserted.setdefault(doc.kind, [0] * len(self.LENGTH_BUCKETS))
            counts[next(i for i, (lo, hi) in enumerate(self.LENGTH_BUCKETS) if lo <= n < hi)] += 1
            out.append((row, doc))
        return out

    def summary(self) -> dict[str, Any]:
        buckets = [f"{lo}-{hi if hi < 1 << 30 else ''}" for lo, hi in self.LENGTH_BUCKETS]
        return {
            "token_fraction": self.synthetic_tokens / max(self.tokens, 1),
            "synthetic_tokens": self.synthetic_tokens,
            "answer_tokens": self.answer_tokens,
            "docs_inserted": self.next,
            "docs_skipped_by_cap": self.skipped,
            "pool_size": len(self.pool),
            "pool_passes": self.next / max(len(self.pool), 1),
            "docs_by_kind_and_tokens": {
                k: dict(zip(buckets, v, strict=True)) for k, v in sorted(self.inserted.items())
            },
        }


def build_mix(
    cfg: TrainConfig, tok: PreTrainedTokenizerBase, stream: np.ndarray, rng: random.Random
) -> SyntheticMix:
    """The synthetic pool (made up front, so that the training loop never waits on it) and its mix."""
    t0 = time.time()
    synth = SyntheticDocs(
        tok,
        stream,
        rng,
        passkey_share=cfg.passkey_share,
        passkey_len=(cfg.passkey_min_len, cfg.passkey_max_len),
        filler_share=cfg.passkey_filler_share,
        depth_power=cfg.passkey_depth_power,
        kv_len=(cfg.kv_min_len, cfg.kv_max_len),
    )
    pool = [synth.sample(cfg.seq_len + 1) for _ in range(cfg.synthetic_pool)]
    mean = np.mean([len(d.ids) for d in pool]) if pool else 0.0
    print(
        f"synthetic pool: {len(pool)} docs ({sum(d.kind != 'kv' for d in pool)} pass-key), "
        f"mean {mean:.0f} tokens, in {time.time() - t0:.1f}s; expected token fraction "
        f"{cfg.synthetic_prob * mean / cfg.seq_len:.4f}, cap {cfg.synthetic_max_fraction}",
        flush=True,
    )
    return SyntheticMix(pool, rng, cfg.synthetic_prob, cfg.synthetic_max_fraction)


# --------------------------------------------------------------------------- training


def progress(cfg: TrainConfig, step: int, elapsed: float) -> float:
    """How much of the run is done, 0 to 1 (by steps with ``--steps``, else by time)."""
    return step / cfg.steps if cfg.steps else elapsed / cfg.time_budget_s


def lr_at(cfg: TrainConfig, step: int, elapsed: float) -> float:
    """Warmup-stable-decay; the decay covers the last ``decay_fraction`` of the run (time or steps)."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps)
    frac = progress(cfg, step, elapsed)
    decay = 1.0 if frac < 1 - cfg.decay_fraction else max(0.0, (1 - frac) / cfg.decay_fraction)
    return cfg.lr * warm * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay)


def synthetic_prob_at(cfg: TrainConfig, frac: float) -> float:
    """``--synthetic-decay-prob`` during the decay phase if set, else ``--synthetic-prob``."""
    decaying = frac >= 1 - cfg.decay_fraction
    return cfg.synthetic_decay_prob if decaying and cfg.synthetic_decay_prob > 0 else cfg.synthetic_prob


def _loss(
    model: torch.nn.Module, batch: torch.Tensor, weights: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to train on, mean next-token loss): the first weights each target by ``weights`` (None:
    all 1) over the number of targets, so that natural text keeps its scale whatever the weights."""
    with torch.autocast(device_type=batch.device.type, dtype=torch.bfloat16):
        logits = model(input_ids=batch[:, :-1]).logits
    nll = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none"
    )
    mean = nll.mean()
    return (mean if weights is None else (nll * weights.reshape(-1)).sum() / nll.numel()), mean


def _answer_weights(
    placed: list[tuple[int, SyntheticDoc]], shape: tuple[int, int], weight: float, device: torch.device
) -> torch.Tensor | None:
    """Per-target loss weights: ``weight`` where the target is an answer token of a placed document."""
    if weight == 1 or not any(doc.answers for _, doc in placed):
        return None
    weights = torch.ones(shape, device=device)
    for row, doc in placed:
        weights[row, [i - 1 for i in doc.answers]] = weight  # target t is token t + 1 of the row
    return weights


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train, save, evaluate; returns the report that is also written to ``<out>/train_report.json``.

    ``<out>`` receives the bf16 model in safetensors shards of at most 15 MB, the tokenizer files,
    ``train_report.json`` (configuration, loss log, synthetic-document counts, evaluation) and
    ``loss_curve.png``.
    """
    t_start = time.time()
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    np_rng = np.random.default_rng(cfg.seed)
    device = torch.device(cfg.device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    tok = AutoTokenizer.from_pretrained(cfg.tokenizer_dir)
    stream = load_stream(cfg.data, cfg.max_tokens)
    n_stream = len(stream)
    config = model_config(len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, cfg.tiny)
    if cfg.init_from:
        model = LlamaForCausalLM.from_pretrained(cfg.init_from, dtype=torch.float32).to(device)
        assert model.config.vocab_size == config.vocab_size, "tokenizer does not match the initial model"
        config = model.config
    else:
        model = LlamaForCausalLM(config).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params / 1e6:.2f}M, stream {n_stream / 1e6:.1f}M tokens", flush=True)

    mix = build_mix(cfg, tok, stream, rng)

    stream_t = torch.from_numpy(stream.astype(np.int64)).to(device)
    window = torch.arange(cfg.seq_len + 1, device=device)
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.ndim >= 2 else no_decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
        fused=device.type == "cuda",
    )
    step_fn = torch.compile(model) if cfg.compile else model

    losses: list[dict[str, float]] = []
    tokens = 0
    step = 0
    t_train = time.time()
    while True:
        elapsed = time.time() - t_train
        if (cfg.steps and step >= cfg.steps) or (not cfg.steps and elapsed >= cfg.time_budget_s):
            break
        lr = lr_at(cfg, step, elapsed)
        for g in opt.param_groups:
            g["lr"] = lr
        mix.prob = synthetic_prob_at(cfg, progress(cfg, step, elapsed))
        offsets = torch.from_numpy(np_rng.integers(0, n_stream - cfg.seq_len - 1, cfg.batch_size)).to(device)
        batch = stream_t[offsets[:, None] + window]
        placed = mix.plan(cfg.batch_size, cfg.seq_len)
        for row, doc in placed:
            batch[row, : len(doc.ids)] = torch.tensor(doc.ids, device=device)
        weights = _answer_weights(placed, (cfg.batch_size, cfg.seq_len), cfg.answer_loss_weight, device)
        try:
            train_loss, loss = _loss(step_fn, batch, weights)
            train_loss.backward()
        except Exception as exc:  # a failed compilation must not cost the (single) GPU run
            if step_fn is model:
                raise
            print(f"torch.compile failed ({type(exc).__name__}: {exc}); continuing eagerly", flush=True)
            step_fn = model
            opt.zero_grad(set_to_none=True)
            train_loss, loss = _loss(step_fn, batch, weights)
            train_loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += batch[:, :-1].numel()
        step += 1
        if step % cfg.log_every == 0 or step == 1:
            rec = {
                "step": step,
                "tokens": tokens,
                "time_s": time.time() - t_train,
                "lr": lr,
                "loss": loss.item(),
            }
            losses.append(rec)
            if step % (cfg.log_every * 10) == 0 or step == 1:
                tps = tokens / max(rec["time_s"], 1e-9)
                print(f"step {step} loss {rec['loss']:.3f} lr {lr:.2e} {tps / 1e3:.0f}k tok/s", flush=True)
    train_s = time.time() - t_train
    final_loss = float(np.mean([r["loss"] for r in losses[-5:]])) if losses else float("nan")
    print(
        f"trained {step} steps, {tokens / 1e6:.1f}M tokens in {train_s:.0f}s, loss {final_loss:.3f}",
        flush=True,
    )

    model = model.to(torch.bfloat16).eval()  # evaluate exactly what is shipped
    report: dict[str, Any] = {
        "config": asdict(cfg),
        "model": config.to_dict(),
        "parameters": n_params,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "steps": step,
        "tokens_trained": tokens,
        "stream_tokens": n_stream,
        "epochs": tokens / n_stream,
        "synthetic_token_fraction": mix.synthetic_tokens / max(tokens, 1),
        "synthetic": mix.summary(),
        "train_seconds": train_s,
        "final_loss": final_loss,
        "loss_log": losses,
    }
    # Save first, so that a failure (or a time limit) during the evaluation still leaves the model.
    model.save_pretrained(str(out), max_shard_size="15MB")
    _save_tokenizer(cfg.tokenizer_dir, tok, out)
    _write_report(out, report, t_start)
    if not cfg.skip_eval:
        t0 = time.time()
        report["eval"] = eval_reference.evaluate(
            model, tok, max_docs=cfg.eval_max_docs, trials=cfg.eval_trials
        )
        report["eval_seconds"] = time.time() - t0
        print(json.dumps(report["eval"], indent=1), flush=True)
        _write_report(out, report, t_start)
    try:  # the loss curve is a convenience: a missing matplotlib must not fail the run
        name = "tiny model" if cfg.tiny else reference.REFERENCE_MODEL
        eval_reference.plot_loss([out / REPORT], out / "loss_curve.png", name=name)
    except Exception as exc:
        print(f"no loss curve ({type(exc).__name__}: {exc})", flush=True)
    return report


def _save_tokenizer(tokenizer_dir: str, tok: PreTrainedTokenizerBase, out: Path) -> None:
    """Copy the tokenizer files byte for byte (a re-serialisation would add version-specific keys)."""
    names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
    files = [Path(tokenizer_dir) / n for n in names if (Path(tokenizer_dir) / n).is_file()]
    if not files:
        tok.save_pretrained(str(out))
    for f in files:
        shutil.copyfile(f, out / f.name)


def _write_report(out: Path, report: dict[str, Any], t_start: float) -> None:
    report["total_seconds"] = time.time() - t_start
    tmp = out / (REPORT + ".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, out / REPORT)


def simulate(cfg: TrainConfig, steps: int) -> dict[str, Any]:
    """Which synthetic documents a run of ``steps`` steps would insert, without a model or a GPU."""
    rng = random.Random(cfg.seed)
    tok = AutoTokenizer.from_pretrained(cfg.tokenizer_dir)
    stream = load_stream(cfg.data, cfg.max_tokens)
    mix = build_mix(cfg, tok, stream, rng)
    for step in range(steps):
        mix.prob = synthetic_prob_at(cfg, step / steps)
        mix.plan(cfg.batch_size, cfg.seq_len)
    return {"steps": steps, "tokens": mix.tokens, **mix.summary()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    defaults = TrainConfig(data="", tokenizer_dir="", out="")
    parser.add_argument("--data", required=True, help="uint16 token stream (.u16 or .u16.xz)")
    parser.add_argument("--tokenizer-dir", default="models/squeeze-ref-25m", help="tokenizer to train with")
    parser.add_argument("--out", required=True, help=f"folder for the sharded model, tokenizer and {REPORT}")
    for f in fields(TrainConfig):
        if f.name in ("data", "tokenizer_dir", "out"):
            continue
        value = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action="store_true", help=f.metadata.get("help"))
        else:
            parser.add_argument(flag, type=type(value), default=value, help=f.metadata.get("help"))
    parser.add_argument(
        "--simulate-steps",
        type=int,
        default=0,
        help="> 0: only build the synthetic pool and report which documents this many steps would insert "
        "(no model, no training); --out is then not written",
    )
    args = vars(parser.parse_args())
    simulate_steps = args.pop("simulate_steps")
    cfg = TrainConfig(**args)
    if simulate_steps:
        print(json.dumps(simulate(cfg, simulate_steps), indent=1))
    else:
        train(cfg)


if __name__ == "__main__":
    main()
