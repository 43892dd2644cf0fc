"""PyramidKV's fixed schedule: budgets fall linearly with depth, at the same total."""

import torch

from squeezekv.allocators import register_allocator
from squeezekv.config import SqueezeConfig


@register_allocator("pyramid")
def pyramid(similarity: torch.Tensor, mean_budget: int, config: SqueezeConfig) -> torch.Tensor:
    layers = similarity.numel()
    bottom = mean_budget / config.pyramid_beta
    top = 2 * mean_budget - bottom
    if layers == 1:
        return torch.full_like(similarity, float(mean_budget))
    return torch.linspace(top, bottom, layers, dtype=torch.float64)
