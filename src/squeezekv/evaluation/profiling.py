"""Per-layer similarity profiles, the budgets each allocator derives, and how stable the grouping is.

SqueezeAttention groups layers by their prefill similarity and squeezes the most similar group.
Whether that grouping is a property of the model or of the prompt is open; ``stability`` measures
it over many prompts: how often each layer is squeezed, and how alike the groupings of two prompts
are (Jaccard of the squeezed sets, adjusted Rand index of the full clusterings).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from itertools import combinations
from math import comb

import torch
from torch import nn

import squeezekv
from squeezekv import SqueezeConfig
from squeezekv.allocators import resolve_allocator
from squeezekv.allocators.squeeze import Squeeze, kmeans_1d


@dataclass(frozen=True)
class Profile:
    """One prompt's per-layer similarity, its clustering (0 = least similar) and budgets per allocator."""

    prompt_tokens: int
    similarity: list[float]
    labels: list[int]
    budgets: dict[str, list[int]]

    @property
    def squeezed(self) -> list[bool]:
        top = max(self.labels)
        return [label == top and top > 0 for label in self.labels]


@torch.inference_mode()
def layer_profile(
    model: nn.Module, prompt: list[int], config: SqueezeConfig, allocators: list[str]
) -> Profile:
    """Prefills ``prompt`` once and plans the budget of every allocator from the same similarities.

    Similarities do not depend on the policy, so the prefill runs under ``window`` (which needs no
    scores, no question start and no second pass), unless an allocator reads the layers' score
    dispersion: then it runs under ``config``'s policy, whose scores that allocator plans from."""
    readers = [name for name in allocators if resolve_allocator(name).reads_dispersion]
    prefill = (
        dataclasses.replace(config, allocator=readers[0])
        if readers
        else dataclasses.replace(config, policy="window")
    )
    ids = torch.tensor([prompt], device=model.device)
    with squeezekv.compress(model, prefill) as session:
        model(input_ids=ids, use_cache=True)
        similarity, windows, dims = session.similarity, session.sliding_windows, session.cache.head_dims
        dispersion = session.dispersion
    tokens = torch.tensor([len(prompt)])
    budgets = {
        name: dataclasses.replace(
            config, allocator=config.allocator if name == config.allocator.name else name
        )
        .plan_budgets(similarity, tokens, windows, head_dims=dims, dispersion=dispersion)[0]
        .tolist()
        for name in allocators
    }
    values = similarity[0].tolist()
    groups = getattr(config.allocator, "groups", Squeeze.groups)  # squeeze's grouping, whatever allocates
    return Profile(len(prompt), values, kmeans_1d(values, groups), budgets)


def jaccard(a: set[int], b: set[int]) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def adjusted_rand(a: list[int], b: list[int]) -> float:
    """Adjusted Rand index of two clusterings of the same items (1 = identical, ~0 = chance)."""
    pairs = comb(len(a), 2)
    joint = sum(comb(n, 2) for n in Counter(zip(a, b, strict=True)).values())
    left = sum(comb(n, 2) for n in Counter(a).values())
    right = sum(comb(n, 2) for n in Counter(b).values())
    expected = left * right / pairs if pairs else 0.0
    top = (left + right) / 2
    return 1.0 if top == expected else (joint - expected) / (top - expected)


@dataclass(frozen=True)
class Stability:
    prompts: int
    squeezed_frequency: list[float]
    mean_jaccard: float
    mean_adjusted_rand: float
    mean_similarity: list[float]


def stability(profiles: list[Profile]) -> Stability:
    if len(profiles) < 2:
        raise ValueError("grouping stability needs at least 2 prompts")
    squeezed = [{i for i, flag in enumerate(p.squeezed) if flag} for p in profiles]
    layers = len(profiles[0].similarity)
    pairs = list(combinations(range(len(profiles)), 2))
    return Stability(
        prompts=len(profiles),
        squeezed_frequency=[sum(i in s for s in squeezed) / len(profiles) for i in range(layers)],
        mean_jaccard=sum(jaccard(squeezed[i], squeezed[j]) for i, j in pairs) / len(pairs),
        mean_adjusted_rand=sum(adjusted_rand(profiles[i].labels, profiles[j].labels) for i, j in pairs)
        / len(pairs),
        mean_similarity=[sum(p.similarity[i] for p in profiles) / len(profiles) for i in range(layers)],
    )


def profile_table(profile: Profile) -> str:
    names = list(profile.budgets)
    lines = [
        f"prompt tokens: {profile.prompt_tokens}",
        f"{'layer':>5}  {'similarity':>10}  {'group':>5}  " + "  ".join(f"{n:>8}" for n in names),
    ]
    for layer, value in enumerate(profile.similarity):
        mark = "*" if profile.squeezed[layer] else " "
        budgets = "  ".join(f"{profile.budgets[n][layer]:>8}" for n in names)
        lines.append(f"{layer:>5}  {value:>10.4f}  {profile.labels[layer]:>4}{mark}  {budgets}")
    lines.append("* = squeezed group (highest similarity cluster)")
    return "\n".join(lines)


def stability_table(result: Stability) -> str:
    lines = [
        f"prompts: {result.prompts}",
        f"mean pairwise Jaccard of squeezed layer sets: {result.mean_jaccard:.4f}",
        f"mean pairwise adjusted Rand index of groupings: {result.mean_adjusted_rand:.4f}",
        f"{'layer':>5}  {'mean similarity':>15}  {'squeezed':>8}",
    ]
    for layer, (value, frequency) in enumerate(
        zip(result.mean_similarity, result.squeezed_frequency, strict=True)
    ):
        lines.append(f"{layer:>5}  {value:>15.4f}  {frequency:>8.2f}")
    return "\n".join(lines)
