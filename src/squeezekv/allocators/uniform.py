"""Every layer gets the same budget: the baseline SqueezeAttention is measured against."""

from dataclasses import dataclass

import torch

from squeezekv.allocators.base import Allocator, Targets, register_allocator


@register_allocator
@dataclass(frozen=True)
class Uniform(Allocator):
    name = "uniform"

    def targets(self, similarity: torch.Tensor, mean_budget: int) -> Targets:
        return Targets(torch.full_like(similarity, float(mean_budget)))
