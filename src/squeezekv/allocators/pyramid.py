"""PyramidKV's fixed schedule: budgets fall linearly with depth, at the same total."""

import torch

from squeezekv.allocators import Targets, register_allocator
from squeezekv.config import SqueezeConfig


@register_allocator("pyramid")
def pyramid(similarity: torch.Tensor, mean_budget: int, config: SqueezeConfig) -> Targets:
    layers = similarity.numel()
    bottom = mean_budget / config.pyramid_beta
    top = 2 * mean_budget - bottom
    if layers == 1:
        return Targets(torch.full_like(similarity, float(mean_budget)))
    return Targets(torch.linspace(top, bottom, layers, dtype=torch.float64))
