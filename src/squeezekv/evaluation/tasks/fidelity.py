"""How far a compressed cache moves the next-token distribution from the full cache's.

Along the full cache's greedy continuation of each prompt (teacher-forced, so both caches see the
same tokens) it reports the mean KL(full || compressed) in nats and how often the compressed
cache's top-1 token is the full cache's. It reacts to any change, so it separates budgets even
where a small model's perplexity barely moves.
"""

from __future__ import annotations

import torch

from squeezekv.evaluation.decoding import decode
from squeezekv.evaluation.metrics import kl_divergence
from squeezekv.evaluation.tasks.base import Task, register_task
from squeezekv.evaluation.tasks.ppl import document_windows, stacked


@register_task
class Fidelity(Task):
    name = "fidelity"
    metric = "kl"
    higher_is_better = False

    def samples(self, tokenizer, model):
        return document_windows(self, tokenizer, model)

    def prepare(self, model, tokenizer, samples):
        steps = len(samples[0].facts["targets"])
        full = decode(model, stacked(samples, None, model.device), steps, None)
        return [(full.logits[row], full.tokens[row]) for row in range(len(samples))]

    def evaluate(self, model, tokenizer, samples, prepared, config):
        reference_logits = [logits for logits, _ in prepared]
        greedy = torch.stack([tokens for _, tokens in prepared])
        decoded = decode(model, stacked(samples, None, model.device), greedy.shape[1], config, forced=greedy)
        kl = kl_divergence(torch.stack(reference_logits), decoded.logits).cpu()
        agree = (decoded.logits.argmax(-1) == greedy).float().cpu()
        return [
            {
                "metrics": {"kl": float(kl[row].mean()), "top1": float(agree[row].mean())},
                "kv_tokens": decoded.kv_tokens,
            }
            for row in range(len(samples))
        ]
