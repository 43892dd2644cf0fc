"""Every layer gets the same budget: the baseline SqueezeAttention is measured against."""

import torch

from squeezekv.allocators import register_allocator
from squeezekv.config import SqueezeConfig


@register_allocator("uniform")
def uniform(similarity: torch.Tensor, mean_budget: int, config: SqueezeConfig) -> torch.Tensor:
    return torch.full_like(similarity, float(mean_budget))
