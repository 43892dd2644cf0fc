"""Perplexity of held-out text scored token by token after a compressed prompt.

Documents come from every source of the held-out set in turn (so ``--limit 32`` is 32 documents
from 32 sources, not one source's first files). Each gives one fixed window of ``context`` tokens:
the first three quarters are the prompt (prefilled and compressed), the next ``score_tokens`` are
fed one at a time while the cache keeps evicting, and each is scored before it is fed.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import torch

from squeezekv.evaluation.data import load_documents
from squeezekv.evaluation.decoding import decode
from squeezekv.evaluation.metrics import perplexity, token_nll
from squeezekv.evaluation.tasks.base import Sample, Task, model_context, register_task

PROMPT_SHARE = 0.75


def document_windows(task: Task, tokenizer, model) -> list[Sample]:
    """One prompt + continuation window per document long enough to fill it."""
    context = task.options.context or model_context(model)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and context > limit:
        raise ValueError(f"--context {context} exceeds the model's maximum of {limit} positions")
    prompt_tokens = int(context * PROMPT_SHARE)
    scored = min(task.options.score_tokens, context - prompt_tokens)
    if prompt_tokens < 2 or scored < 1:
        raise ValueError(f"--context {context} is too short to hold a prompt and scored tokens")
    samples, short = [], 0
    for document in load_documents(task.options.data):
        ids = tokenizer(document["text"]).input_ids
        if len(ids) < prompt_tokens + scored:
            short += 1
            continue
        samples.append(
            Sample(
                document["id"], ids[:prompt_tokens], {"targets": ids[prompt_tokens : prompt_tokens + scored]}
            )
        )
    if short:
        print(
            f"{task.name}: skipped {short} documents shorter than {prompt_tokens + scored} tokens",
            file=sys.stderr,
        )
    if not samples:
        raise ValueError(f"no document holds the {prompt_tokens + scored} tokens a {task.name} window needs")
    return samples


def stacked(samples: list[Sample], key: str | None, device) -> torch.Tensor:
    rows = [sample.prompt if key is None else sample.facts[key] for sample in samples]
    return torch.tensor(rows, dtype=torch.long, device=device)


def nll_result(nll: list[float], kv_tokens: float) -> dict:
    return {
        "metrics": {"ppl": perplexity(nll), "nll": sum(nll) / len(nll)},
        "nll_sum": sum(nll),
        "tokens": len(nll),
        "kv_tokens": kv_tokens,
    }


@register_task
class Perplexity(Task):
    name = "ppl"
    metric = "ppl"
    higher_is_better = False
    relative = True
    peer_supported = True

    def samples(self, tokenizer, model):
        return document_windows(self, tokenizer, model)

    def evaluate(self, model, tokenizer, samples, prepared, config):
        targets = stacked(samples, "targets", model.device)
        decoded = decode(
            model, stacked(samples, None, model.device), targets.shape[1], config, forced=targets
        )
        nll = token_nll(decoded.logits, targets).cpu()
        return [nll_result(row.tolist(), decoded.kv_tokens) for row in nll]

    def aggregate(self, results):
        """Perplexity over all scored tokens of all documents (not a mean of perplexities)."""
        mean_nll = sum(r["nll_sum"] for r in results) / sum(r["tokens"] for r in results)
        return {"ppl": math.exp(mean_nll), "nll": mean_nll}

    def bootstrap_terms(self, results):
        """Each document's mean NLL weighted by its tokens; exp of their weighted mean is the perplexity."""
        return [r["nll_sum"] / r["tokens"] for r in results], [r["tokens"] for r in results], np.exp

    def peer_job(self, sample):
        return {"kind": "score", "prompt": sample.prompt, "targets": sample.facts["targets"]}

    def peer_result(self, tokenizer, sample, output):
        return nll_result(output["nll"], output["kv_tokens"])
