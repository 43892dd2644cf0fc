"""Control for SqueezeAttention's signal: squeeze as many layers as ``squeeze`` would, but the ones
with the LOWEST similarity (the most important by the paper's measure).

If this costs about what ``squeeze`` costs, the loss comes from the size of the squeezed group, not
from which layers the cosine signal picks.
"""

from dataclasses import dataclass

import torch

from squeezekv.allocators.base import register_allocator
from squeezekv.allocators.squeeze import Squeeze


@register_allocator
@dataclass(frozen=True)
class SqueezeLowest(Squeeze):
    name = "squeeze-lowest"

    def squeezed_layers(self, similarity: torch.Tensor) -> torch.Tensor:
        count = int(super().squeezed_layers(similarity).sum())
        squeezed = torch.zeros(similarity.numel(), dtype=torch.bool)
        squeezed[torch.argsort(similarity, stable=True)[:count]] = True
        return squeezed
