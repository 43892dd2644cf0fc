#!/usr/bin/env python3
"""Long-range evaluation of a causal LM: held-out perplexity by position bucket and pass-key retrieval.

Used by ``scripts/train_model.py`` right after training (on the GPU) and on its own to re-check a
saved model, e.g. ``python scripts/eval_reference.py --model models/squeeze-ref-25m --device cpu``.
A model with working long-range attention has lower perplexity in later buckets (it uses more context)
and retrieves a pass key from anywhere in the context.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import re
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase


def _load_reference() -> Any:
    """Import ``squeezekv/reference.py`` by path: it needs only the standard library, so the training
    machine can use it without installing (or importing) the rest of the package."""
    path = Path(__file__).resolve().parents[1] / "src" / "squeezekv" / "reference.py"
    spec = importlib.util.spec_from_file_location("squeezekv_reference", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up while the class is created
    spec.loader.exec_module(module)
    return module


reference = _load_reference()

BUCKETS: tuple[tuple[int, int], ...] = ((0, 512), (512, 1024), (1024, 2048), (2048, 4096))
PASSKEY_LENGTHS = (1024, 2048, 4096)


@torch.no_grad()
def ppl_by_bucket(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    context: int = 4096,
    buckets: tuple[tuple[int, int], ...] = BUCKETS,
    batch_size: int = 4,
) -> dict[str, Any]:
    """Perplexity of the tokens at each position range, over the first ``context`` tokens of each text.

    Position ``p`` is the index of the predicted token, so bucket (0, 512) covers predictions made
    with at most 511 tokens of context. Texts shorter than ``context`` tokens are skipped.
    """
    device = next(model.parameters()).device
    ids = [tokenizer(t, add_special_tokens=True)["input_ids"][:context] for t in texts]
    ids = [x for x in ids if len(x) == context]
    nll = torch.zeros(context - 1, dtype=torch.float64)
    for i in range(0, len(ids), batch_size):
        x = torch.tensor(ids[i : i + batch_size], device=device)
        logits = model(input_ids=x[:, :-1]).logits.float()
        loss = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")
        nll += loss.sum(0).double().cpu()
    n = max(len(ids), 1)
    result: dict[str, Any] = {"docs": len(ids), "context": context, "buckets": {}}
    for lo, hi in buckets:
        sl = nll[max(lo, 1) - 1 : hi - 1]  # nll[j] is the loss of the token at position j + 1
        result["buckets"][f"{lo}-{hi}"] = math.exp(sl.sum().item() / (n * len(sl)))
    result["overall"] = math.exp(nll.sum().item() / (n * len(nll)))
    return result


@torch.no_grad()
def passkey_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    lengths: tuple[int, ...] = PASSKEY_LENGTHS,
    trials: int = 50,
    seed: int = 0,
) -> dict[str, Any]:
    """Fraction of prompts (5-digit key at a uniformly random depth) answered exactly by greedy decoding,
    with the first three prompts and every missed one per length."""
    device = next(model.parameters()).device
    rng = random.Random(seed)
    out: dict[str, Any] = {"trials": trials, "accuracy": {}, "examples": {}, "misses": {}}
    for length in lengths:
        correct = 0
        for t in range(trials):
            key = reference.random_passkey(rng)
            p = reference.passkey_prompt(tokenizer, length - 8, depth=rng.random(), key=key)
            x = tokenizer(p.prompt, return_tensors="pt").to(device)
            gen = model.generate(
                **x, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id, use_cache=True
            )
            text = tokenizer.decode(gen[0, x["input_ids"].shape[1] :], skip_special_tokens=True)
            ok = re.match(rf"\s*{p.key}(?!\d)", text) is not None
            correct += ok
            if not ok:
                out["misses"].setdefault(str(length), []).append(
                    {"key": p.key, "depth": round(p.depth, 3), "output": text}
                )
            if t < 3:
                out["examples"].setdefault(str(length), []).append(
                    {
                        "key": p.key,
                        "depth": round(p.depth, 3),
                        "output": text,
                        "tokens": x["input_ids"].shape[1],
                    }
                )
        out["accuracy"][str(length)] = correct / trials
    return out


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    max_docs: int = 0,
    trials: int = 50,
    batch_size: int = 4,
    lengths: tuple[int, ...] = PASSKEY_LENGTHS,
    seed: int = 0,
) -> dict[str, Any]:
    """Both evaluations on the bundled held-out long documents."""
    docs = reference.load_heldout("long")
    if max_docs:
        docs = docs[:max_docs]
    model.eval()
    return {
        "ppl_by_bucket": ppl_by_bucket(model, tokenizer, [d["text"] for d in docs], batch_size=batch_size),
        "passkey": passkey_accuracy(model, tokenizer, lengths, trials, seed),
    }


def loss_runs(path: Path) -> list[tuple[list[tuple[int, float]], int]]:
    """(loss log as (tokens, loss) pairs, tokens trained) of the run in a ``train_model`` report, or of
    each stage of the shipped model in a training summary (``models/squeeze-ref-25m/training.json``)."""
    data = json.loads(path.read_text())
    if "stages" in data:
        return [
            ([(t, loss) for t, loss in s["loss_log"]], s["tokens_trained"])
            for s in data["stages"]
            if s["chain"]
        ]
    return [([(r["tokens"], r["loss"]) for r in data["loss_log"]], data["tokens_trained"])]


def plot_loss(reports: list[Path], png: Path, name: str = "") -> None:
    """Training loss against tokens seen; consecutive runs (e.g. a continued run) are chained.

    ``name`` (default: the PNG's folder name) heads the title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [run for path in reports for run in loss_runs(path)]
    fig, ax = plt.subplots(figsize=(7, 4))
    offset = 0
    for i, (log, tokens_trained) in enumerate(runs):
        ax.plot([offset + t / 1e6 for t, _ in log], [loss for _, loss in log], lw=0.8, label=f"run {i + 1}")
        offset += tokens_trained / 1e6
    title = f"{name or png.parent.name}: training loss (one batch per point, every 10 steps)"
    ax.set(xlabel="training tokens (M)", ylabel="loss (nats/token)", ylim=(1.5, 6), title=title)
    ax.grid(alpha=0.3)
    if len(runs) > 1:
        ax.legend()
    fig.tight_layout()
    tmp = png.with_name(png.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, png)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("models/squeeze-ref-25m"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-docs", type=int, default=0, help="0: all held-out long documents")
    parser.add_argument("--trials", type=int, default=50, help="pass-key prompts per length")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the pass-key prompts (0: the model card's prompts)"
    )
    parser.add_argument(
        "--lengths", type=int, nargs="+", default=list(PASSKEY_LENGTHS), help="pass-key prompt lengths"
    )
    parser.add_argument("--passkey-only", action="store_true", help="skip the held-out perplexity")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--plot-loss", type=Path, help="only plot the loss of --reports into this PNG")
    parser.add_argument(
        "--reports",
        type=Path,
        nargs="*",
        default=[],
        help="train_report.json files of train_model, or a training summary such as "
        "models/squeeze-ref-25m/training.json",
    )
    args = parser.parse_args()
    if args.trials < 1:
        parser.error(f"--trials {args.trials}: must be at least 1")
    if bad := [n for n in args.lengths if n < 64]:
        parser.error(f"--lengths {bad}: every pass-key prompt length must be at least 64 tokens")
    if args.plot_loss:
        plot_loss(args.reports, args.plot_loss)
        return
    tokenizer = AutoTokenizer.from_pretrained(str(args.model))
    model = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=torch.bfloat16).to(args.device)
    if args.passkey_only:
        res = {"passkey": passkey_accuracy(model, tokenizer, tuple(args.lengths), args.trials, args.seed)}
    else:
        res = evaluate(
            model, tokenizer, args.max_docs, args.trials, lengths=tuple(args.lengths), seed=args.seed
        )
    text = json.dumps(res, indent=2) + "\n"
    if args.out:
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, args.out)
    print(text)


if __name__ == "__main__":
    main()
