"""Control for SqueezeAttention's signal: squeeze a random set of layers, as many as ``squeeze``
would, with the same budget rule.

Drawn from ``seed`` and the group size alone, so a run is reproducible and every prompt with the same
group size squeezes the same layers.
"""

from dataclasses import dataclass

import torch

from squeezekv.allocators.base import register_allocator
from squeezekv.allocators.squeeze import Squeeze


@register_allocator
@dataclass(frozen=True)
class SqueezeRandom(Squeeze):
    name = "squeeze-random"
    seed: int = 0

    def squeezed_layers(self, similarity: torch.Tensor) -> torch.Tensor:
        count = int(super().squeezed_layers(similarity).sum())
        draw = torch.Generator().manual_seed(self.seed * 1000 + count)
        squeezed = torch.zeros(similarity.numel(), dtype=torch.bool)
        squeezed[torch.randperm(similarity.numel(), generator=draw)[:count]] = True
        return squeezed
