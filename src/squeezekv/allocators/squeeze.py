"""SqueezeAttention's allocator: squeeze the layers whose attention changes the residual least.

Layers are clustered by their cosine similarity (exact 1-D k-means, so the grouping is
deterministic); the cluster with the highest centroid gets ``p * b`` per layer and the other layers
share the rest equally, keeping the total at ``L * b``. A model with fewer layers than ``groups``
(or fewer distinct similarities) is clustered into as many groups as it has.
"""

from dataclasses import dataclass

import torch

from squeezekv.allocators.base import Allocator, Targets, register_allocator


def kmeans_1d(values: list[float], groups: int) -> list[int]:
    """Optimal 1-D k-means by dynamic programming; cluster labels ordered by centroid (0 = lowest).

    With fewer distinct values than ``groups`` there are only as many clusters as distinct values.
    """
    order = sorted(range(len(values)), key=lambda i: (values[i], i))
    xs = [values[i] for i in order]
    n = len(xs)
    k = min(groups, len(set(xs)))
    prefix, prefix_sq = [0.0], [0.0]
    for x in xs:
        prefix.append(prefix[-1] + x)
        prefix_sq.append(prefix_sq[-1] + x * x)

    def cost(i: int, j: int) -> float:  # squared error of xs[i:j] around its mean
        s = prefix[j] - prefix[i]
        return prefix_sq[j] - prefix_sq[i] - s * s / (j - i)

    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    start = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for c in range(1, k + 1):
        for j in range(c, n + 1):
            for i in range(c - 1, j):
                candidate = best[c - 1][i] + cost(i, j)
                if candidate < best[c][j]:
                    best[c][j], start[c][j] = candidate, i
    labels = [0] * n
    j = n
    for c in range(k, 0, -1):
        i = start[c][j]
        for position in range(i, j):
            labels[order[position]] = c - 1
        j = i
    return labels


@register_allocator
@dataclass(frozen=True)
class Squeeze(Allocator):
    """``p``: the squeezed group's share of the mean budget; ``groups``: how many clusters."""

    name = "squeeze"
    p: float = 0.35
    groups: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require(0.0 < self.p <= 1.0, "p", "in (0, 1]")
        self.require(self.groups >= 2, "groups", "an integer >= 2")

    def squeezed_layers(self, similarity: torch.Tensor) -> torch.Tensor:
        """Which layers get ``p * b``: the cluster with the highest similarity (least important)."""
        labels = torch.tensor(kmeans_1d(similarity.tolist(), self.groups))
        return labels == labels.max()

    def targets(self, similarity: torch.Tensor, mean_budget: int) -> Targets:
        squeezed = self.squeezed_layers(similarity)
        layers, n_squeezed = similarity.numel(), int(squeezed.sum())
        if n_squeezed == layers:  # one cluster: nothing to tell the layers apart
            return Targets(torch.full_like(similarity, float(mean_budget)))
        low = self.p * mean_budget
        high = (layers * mean_budget - n_squeezed * low) / (layers - n_squeezed)
        return Targets(torch.where(squeezed, low, high).to(torch.float64), adjustable=~squeezed)
