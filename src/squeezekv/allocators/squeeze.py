"""SqueezeAttention's allocator: squeeze the layers whose attention changes the residual least.

Layers are clustered by their cosine similarity (exact 1-D k-means, so the grouping is
deterministic); the cluster with the highest centroid gets ``p * b`` per layer and the other layers
share the rest equally, keeping the total at ``L * b``. A model with fewer layers than ``groups``
(or fewer distinct similarities) is clustered into as many groups as it has.
"""

from dataclasses import dataclass

import numpy as np
import torch

from squeezekv.allocators.base import Allocator, Targets, register_allocator


def kmeans_1d(values: list[float], groups: int) -> list[int]:
    """Optimal 1-D k-means by dynamic programming; cluster labels ordered by centroid (0 = lowest).

    With fewer distinct values than ``groups`` there are only as many clusters as distinct values.
    Each cluster count is one NumPy step over every (start, end) pair: planning runs on the host
    after the prefill, while the GPU waits.
    """
    order = sorted(range(len(values)), key=lambda i: (values[i], i))
    xs = np.array([values[i] for i in order], dtype=np.float64)
    n = len(xs)
    k = min(groups, len(np.unique(xs)))
    prefix = np.concatenate([[0.0], np.cumsum(xs)])
    prefix_sq = np.concatenate([[0.0], np.cumsum(xs * xs)])
    starts, ends = np.arange(n + 1)[:, None], np.arange(n + 1)[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):  # start >= end: no cluster, masked below
        sums = prefix[ends] - prefix[starts]
        cost = prefix_sq[ends] - prefix_sq[starts] - sums * sums / (ends - starts)
    cost = np.where(starts < ends, cost, np.inf)  # cost[i, j]: squared error of xs[i:j] around its mean
    best = np.full(n + 1, np.inf)
    best[0] = 0.0
    first = []  # per cluster count, the start of the last cluster that ends at each j
    for _ in range(k):
        candidates = best[:, None] + cost
        first.append(candidates.argmin(0))  # the lowest start among equals
        best = candidates.min(0)
    labels = [0] * n
    j = n
    for c in range(k, 0, -1):
        i = int(first[c - 1][j])
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
