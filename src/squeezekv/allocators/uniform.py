"""Every layer gets the same budget: the baseline SqueezeAttention is measured against."""

import torch

from squeezekv.allocators import Targets, register_allocator
from squeezekv.config import SqueezeConfig


@register_allocator("uniform")
def uniform(similarity: torch.Tensor, mean_budget: int, config: SqueezeConfig) -> Targets:
    return Targets(torch.full_like(similarity, float(mean_budget)))
