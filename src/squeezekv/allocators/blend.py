"""A soft reading of the cosine signal: every layer keeps ``1 - share`` of the mean budget, and the
rest is shared in proportion to each layer's attention contribution ``1 - similarity``.

SqueezeAttention's squeeze moves most of a budget at once (on SmolLM2, 27 of 30 layers fall to
``p * b``); this keeps the signal's ranking but bounds how far any layer can fall, so a layer the
signal misjudges still holds ``(1 - share) * b``. Not the paper's method.
"""

from dataclasses import dataclass

import torch

from squeezekv.allocators.base import Allocator, Targets, register_allocator


@register_allocator
@dataclass(frozen=True)
class Blend(Allocator):
    name = "blend"
    share: float = 0.3

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require(0.0 <= self.share <= 1.0, "share", "in [0, 1]")

    def targets(self, similarity: torch.Tensor, mean_budget: int) -> Targets:
        contribution = (1.0 - similarity).clamp(min=0.0)
        layers = similarity.numel()
        if float(contribution.sum()) == 0.0:  # no signal: every layer alike
            return Targets(torch.full_like(similarity, float(mean_budget)))
        weights = contribution / contribution.sum() * layers
        return Targets(mean_budget * ((1.0 - self.share) + self.share * weights))
