#!/usr/bin/env python3
"""Train the squeezekv reference model (``LlamaForCausalLM``) on the packed training token stream.

The model is trained for a fixed wall-clock budget, because the GPU machine is lent for a few minutes
at a time: the learning rate follows a warmup-stable-decay schedule whose decay phase is placed on
the elapsed *time* (last ``--decay-fraction`` of the budget), so the run always ends fully decayed
whatever the throughput turns out to be. Training uses bf16 autocast with fp32 master weights.

A small share of the training sequences (``--synthetic-prob``, about 1-2% of tokens) start with a
synthetic retrieval document (a pass key or key-value pairs hidden in filler text and asked for at the
end), which teaches the small model to look far back. Right after training the model is cast to bf16,
evaluated (held-out perplexity by position bucket, pass-key accuracy) and saved in shards.

GPU run:   python scripts/train_model.py --data .carry/train.u16.xz --out /tmp/m --compile
CPU smoke: python scripts/train_model.py --data .carry/train.u16.xz --out /tmp/m --device cpu --tiny --steps 3
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

sys.path.insert(0, str(Path(__file__).resolve().parent))
import eval_reference  # noqa: E402  (sibling script; imports squeezekv/reference.py by path)

reference = eval_reference.reference


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved with the report so a run can be repeated."""

    data: str
    tokenizer_dir: str
    out: str
    device: str = "cuda"
    tiny: bool = False
    seq_len: int = 4096
    batch_size: int = 16
    lr: float = 1.5e-3
    min_lr_ratio: float = 0.0
    warmup_steps: int = 300
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    time_budget_s: float = 450.0
    steps: int = 0  # > 0: stop after this many steps and decay over steps instead of time
    decay_fraction: float = 0.25
    synthetic_prob: float = 0.03
    synthetic_pool: int = 1000
    synthetic_min_len: float = 0.125  # shortest synthetic document, as a fraction of the window
    passkey_share: float = 0.5  # share of pass-key (vs key-value) synthetic documents
    init_from: str = ""  # continue from a saved model (weights only; optimizer and schedule restart)
    max_tokens: int = 0  # > 0: use only this many tokens of the stream (tests)
    compile: bool = False
    log_every: int = 10
    seed: int = 0
    eval_trials: int = 50
    eval_max_docs: int = 0
    skip_eval: bool = False


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


class SyntheticDocs:
    """Pass-key and key-value retrieval documents, as token ids, built from real or repetitive filler.

    The pass-key documents use the evaluation template (``squeezekv.reference.passkey_prompt``) with
    keys of 3-7 digits, but half of them hide the key in natural training text instead of the
    repetitive filler; the key-value documents ask several questions each, so one sequence carries
    several retrieval targets.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        stream: np.ndarray,
        rng: random.Random,
        min_len: float = 0.125,
        passkey_share: float = 0.5,
    ) -> None:
        self.tok = tokenizer
        self.stream = stream
        self.rng = rng
        self.min_len = min_len
        self.passkey_share = passkey_share

    def _natural_text(self, n_tokens: int) -> str:
        start = self.rng.randrange(0, max(1, len(self.stream) - n_tokens))
        return self.tok.decode(self.stream[start : start + n_tokens].tolist(), skip_special_tokens=True)

    def _insert(self, text: str, sentences: list[str]) -> str:
        """Insert sentences at random whitespace positions, in order."""
        cuts = sorted(self.rng.randrange(0, len(text) + 1) for _ in sentences)
        out, prev = [], 0
        for cut, s in zip(cuts, sentences, strict=True):
            sp = text.rfind(" ", 0, cut) + 1 if cut else 0
            sp = max(sp, prev)
            out += [text[prev:sp], s, " "]
            prev = sp
        out.append(text[prev:])
        return "".join(out)

    def passkey(self, n_tokens: int) -> str:
        key = reference.random_passkey(self.rng, digits=self.rng.randint(3, 7))
        depth = self.rng.random()
        if self.rng.random() < 0.5:
            p = reference.passkey_prompt(self.tok, n_tokens, depth=depth, key=key)
            return p.prompt + p.answer
        needle = reference.PASSKEY_NEEDLE.format(key=key)
        filler = self._natural_text(max(16, n_tokens - 80))
        body = self._insert(filler, [needle])
        return reference.PASSKEY_INTRO + body + reference.PASSKEY_QUESTION + f" {key}."

    def key_values(self, n_tokens: int) -> str:
        n_pairs = self.rng.randint(2, max(2, min(24, n_tokens // 150)))  # facts fill <= ~10% of it
        names = self.rng.sample([a + b + c for a in NAMES for b in NAMES for c in NAMES[:8]], n_pairs)
        values = [str(self.rng.randrange(10_000, 100_000)) for _ in names]
        facts = [f"The number for {k} is {v}." for k, v in zip(names, values, strict=True)]
        filler = self._natural_text(max(16, n_tokens - 20 * n_pairs))
        body = self._insert(filler, facts)
        asked = self.rng.sample(range(n_pairs), self.rng.randint(1, min(8, n_pairs)))
        questions = "".join(f"\nWhat is the number for {names[i]}? It is {values[i]}." for i in asked)
        return body + "\n" + questions

    def sample(self, max_tokens: int) -> list[int]:
        """One document of at most ``max_tokens`` tokens (``<s> ... </s>``)."""
        while True:
            n = self.rng.randint(int(max_tokens * self.min_len), max_tokens - 32)
            text = self.passkey(n) if self.rng.random() < self.passkey_share else self.key_values(n)
            ids = self.tok(text, add_special_tokens=True)["input_ids"] + [self.tok.eos_token_id]
            if len(ids) <= max_tokens:
                return ids


# --------------------------------------------------------------------------- training


def lr_at(cfg: TrainConfig, step: int, elapsed: float) -> float:
    """Warmup-stable-decay; the decay covers the last ``decay_fraction`` of the run (time or steps)."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps)
    frac = step / cfg.steps if cfg.steps else elapsed / cfg.time_budget_s
    decay = 1.0 if frac < 1 - cfg.decay_fraction else max(0.0, (1 - frac) / cfg.decay_fraction)
    return cfg.lr * warm * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay)


def _loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    with torch.autocast(device_type=batch.device.type, dtype=torch.bfloat16):
        logits = model(input_ids=batch[:, :-1]).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train, evaluate and save; returns the report that is also written to ``<out>/report.json``."""
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

    # Synthetic retrieval documents are made up front so that the training loop never waits on them.
    t0 = time.time()
    synth = SyntheticDocs(tok, stream, rng, cfg.synthetic_min_len, cfg.passkey_share)
    pool = [torch.tensor(synth.sample(cfg.seq_len + 1)) for _ in range(cfg.synthetic_pool)]
    print(f"synthetic pool: {len(pool)} docs in {time.time() - t0:.1f}s", flush=True)

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
    tokens = synthetic_tokens = 0
    step = 0
    t_train = time.time()
    while True:
        elapsed = time.time() - t_train
        if (cfg.steps and step >= cfg.steps) or (not cfg.steps and elapsed >= cfg.time_budget_s):
            break
        lr = lr_at(cfg, step, elapsed)
        for g in opt.param_groups:
            g["lr"] = lr
        offsets = torch.from_numpy(np_rng.integers(0, n_stream - cfg.seq_len - 1, cfg.batch_size)).to(device)
        batch = stream_t[offsets[:, None] + window]
        for row in range(cfg.batch_size):
            if rng.random() < cfg.synthetic_prob:
                doc = pool[rng.randrange(len(pool))]
                batch[row, : len(doc)] = doc.to(device)
                synthetic_tokens += len(doc)
        try:
            loss = _loss(step_fn, batch)
            loss.backward()
        except Exception as exc:  # a failed compilation must not cost the (single) GPU run
            if step_fn is model:
                raise
            print(f"torch.compile failed ({type(exc).__name__}: {exc}); continuing eagerly", flush=True)
            step_fn = model
            opt.zero_grad(set_to_none=True)
            loss = _loss(step_fn, batch)
            loss.backward()
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
        "synthetic_token_fraction": synthetic_tokens / max(tokens, 1),
        "train_seconds": train_s,
        "final_loss": final_loss,
        "loss_log": losses,
    }
    if not cfg.skip_eval:
        t0 = time.time()
        report["eval"] = eval_reference.evaluate(
            model, tok, max_docs=cfg.eval_max_docs, trials=cfg.eval_trials
        )
        report["eval_seconds"] = time.time() - t0
        print(json.dumps(report["eval"], indent=1), flush=True)
    model.save_pretrained(str(out), max_shard_size="15MB")
    report["total_seconds"] = time.time() - t_start
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, out / "report.json")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = TrainConfig(data="", tokenizer_dir="", out="")
    parser.add_argument("--data", required=True, help="uint16 token stream (.u16 or .u16.xz)")
    parser.add_argument("--tokenizer-dir", default="models/squeeze-ref-25m")
    parser.add_argument("--out", required=True, help="folder for the sharded model and report.json")
    for f in TrainConfig.__dataclass_fields__.values():
        if f.name in ("data", "tokenizer_dir", "out"):
            continue
        value = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action="store_true")
        else:
            parser.add_argument(flag, type=type(value), default=value)
    cfg = TrainConfig(**vars(parser.parse_args()))
    train(cfg)


if __name__ == "__main__":
    main()
