"""Per-layer sensitivity: how much held-out NLL rises when only one layer is squeezed.

For each layer ``l``, the ppl task's windows are scored with layer ``l`` at ``p * b`` and the others
sharing the rest (squeeze's budget rule, so the total stays ``L * b``), against every layer at ``b``
(``uniform``). The measure is the rise in mean NLL per scored token, i.e. the log of the perplexity
ratio: it is the metric the eval grid reports, so the ``oracle`` allocator is tuned on what it is
judged on. The KL divergence from the full cache's next-token distribution is recorded beside it
(less noisy, since it does not depend on which token came next, but not what the grid scores).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from squeezekv import SqueezeConfig
from squeezekv.allocators.oracle import SENSITIVITY_KIND, model_identity
from squeezekv.allocators.squeeze import Squeeze
from squeezekv.evaluation.decoding import decode
from squeezekv.evaluation.metrics import kl_divergence, token_nll
from squeezekv.evaluation.tasks import Sample
from squeezekv.evaluation.tasks.ppl import stacked


@dataclass(frozen=True)
class SqueezeOne(Squeeze):
    """Squeezes exactly ``layer``: the probe of one layer's sensitivity (not a registered allocator)."""

    name = "squeeze-one"
    layer: int = 0

    def squeezed_layers(self, similarity: torch.Tensor) -> torch.Tensor:
        squeezed = torch.zeros(similarity.numel(), dtype=torch.bool)
        squeezed[self.layer] = True
        return squeezed


def measure(
    model: nn.Module,
    samples: list[Sample],
    budget: float | int,
    policy: str,
    p: float,
    batch_size: int,
    progress: bool = True,
) -> dict:
    """Mean NLL and KL from the full cache per scored token: uniform, and each layer squeezed alone."""
    layers = model.config.get_text_config().num_hidden_layers
    configs = {"uniform": SqueezeConfig(budget, policy, "uniform")}
    configs.update(
        {layer: SqueezeConfig(budget, policy, SqueezeOne(p=p, layer=layer)) for layer in range(layers)}
    )
    for sample in samples:  # a budget too small for some prompt fails before any work
        configs["uniform"].tokens_per_layer(len(sample.prompt))
    nll = dict.fromkeys(configs, 0.0)
    kl = dict.fromkeys(configs, 0.0)
    tokens = 0
    batches = [samples[start : start + batch_size] for start in range(0, len(samples), batch_size)]
    with tqdm(total=len(batches) * (len(configs) + 1), unit="pass", disable=not progress) as bar:
        for batch in batches:
            prompt, targets = stacked(batch, None, model.device), stacked(batch, "targets", model.device)
            bar.set_postfix_str("full cache")
            reference = decode(model, prompt, targets.shape[1], None, forced=targets).logits
            bar.update()
            for key, config in configs.items():
                bar.set_postfix_str(f"layer {key} squeezed" if key != "uniform" else "uniform")
                logits = decode(model, prompt, targets.shape[1], config, forced=targets).logits
                nll[key] += float(token_nll(logits, targets).sum())
                kl[key] += float(kl_divergence(reference, logits).sum())
                bar.update()
            tokens += targets.numel()
    per_layer = range(layers)
    return {
        "tokens": tokens,
        "uniform_nll": nll["uniform"] / tokens,
        "uniform_kl": kl["uniform"] / tokens,
        "delta_nll": [(nll[layer] - nll["uniform"]) / tokens for layer in per_layer],
        "delta_ppl_percent": [
            100 * math.expm1((nll[layer] - nll["uniform"]) / tokens) for layer in per_layer
        ],
        "kl": [kl[layer] / tokens for layer in per_layer],
    }


def sensitivity_record(
    model: nn.Module,
    model_name: str,
    samples: list[Sample],
    settings: dict,
    budget: float | int,
    policy: str,
    p: float,
    batch_size: int,
    progress: bool = True,
) -> dict:
    """The JSON an ``oracle`` allocator reads: the model's identity, the settings, the documents and
    the per-layer deltas."""
    if not samples:
        raise ValueError("sensitivity needs at least one document window")
    measured = measure(model, samples, budget, policy, p, batch_size, progress)
    return {
        "kind": SENSITIVITY_KIND,
        "model": model_identity(model, model_name),
        "settings": {"budget": budget, "policy": policy, "p": p, **settings},
        "documents": [sample.id for sample in samples],
        **measured,
    }


def sensitivity_table(stored: dict) -> str:
    """The per-layer deltas as text, least sensitive layer marked by its rank."""
    order = sorted(range(len(stored["delta_nll"])), key=lambda layer: (stored["delta_nll"][layer], layer))
    rank = {layer: position for position, layer in enumerate(order)}
    lines = [
        f"documents: {len(stored['documents'])}, scored tokens: {stored['tokens']}, "
        f"uniform NLL {stored['uniform_nll']:.4f}",
        f"{'layer':>5}  {'delta NLL':>10}  {'delta ppl %':>11}  {'KL':>8}  {'rank':>4}",
    ]
    for layer, delta in enumerate(stored["delta_nll"]):
        lines.append(
            f"{layer:>5}  {delta:>10.5f}  {stored['delta_ppl_percent'][layer]:>11.2f}  "
            f"{stored['kl'][layer]:>8.5f}  {rank[layer]:>4}"
        )
    lines.append("rank 0 = least sensitive (squeezed first by the oracle allocator)")
    return "\n".join(lines)
