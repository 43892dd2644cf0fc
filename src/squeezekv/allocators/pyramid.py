"""PyramidKV's fixed schedule: budgets fall linearly with depth, at the same total."""

from dataclasses import dataclass

import torch

from squeezekv.allocators.base import Allocator, Targets, register_allocator


@register_allocator
@dataclass(frozen=True)
class Pyramid(Allocator):
    """``beta``: the top layer's budget over the bottom one's is about ``2 * beta - 1``."""

    name = "pyramid"
    beta: float = 20.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require(self.beta > 1.0, "beta", "> 1")

    def targets(self, similarity: torch.Tensor, mean_budget: int) -> Targets:
        layers = similarity.numel()
        if layers == 1:
            return Targets(torch.full_like(similarity, float(mean_budget)))
        bottom = mean_budget / self.beta
        top = 2 * mean_budget - bottom
        return Targets(torch.linspace(top, bottom, layers, dtype=torch.float64))
