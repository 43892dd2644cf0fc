"""Budgets that follow how widely each layer's attention spreads over the prompt.

Inspired by CAKE (Qin et al., ICLR 2025, "Cache Allocation with Layer Preference"): a layer whose
attention spreads over many tokens needs more of them kept than one that looks at a few. A layer's
dispersion is the mean over its heads of ``exp(H) / n``, ``H`` the entropy of the scores the policy
accumulated over the ``n`` prompt tokens during the prefill: the effective fraction of the prompt
attended, in (0, 1]. Its preference ``dispersion ** (1 / temperature)`` sets its share of the total
``L * b`` (equal memory with ``uniform``), blended with uniform by ``share``; each sequence is planned
on its own scores.

This is CAKE's spatial-dispersion term only: its temporal-variance term needs every query's
attention, which the cache does not keep, so this is not the paper's method. It needs a policy that
scores tokens (h2o, snapkv, chunkkv, adakv, reconstruct).
"""

from dataclasses import dataclass

import torch

from squeezekv.allocators.base import Allocator, Targets, register_allocator


@register_allocator
@dataclass(frozen=True)
class Cake(Allocator):
    """``temperature``: sharpens (< 1) or flattens (> 1) the layers' preferences; ``share``: the part
    of the mean budget moved by preference (0: uniform), so no layer falls below ``1 - share`` of it."""

    name = "cake"
    reads_dispersion = True
    temperature: float = 1.0
    share: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require(self.temperature > 0.0, "temperature", "> 0")
        self.require(0.0 <= self.share <= 1.0, "share", "in [0, 1]")

    def targets(self, dispersion: torch.Tensor, mean_budget: int) -> Targets:
        if float(dispersion.sum()) == 0.0:
            raise ValueError(
                f"allocator {self.name!r}: no layer's scores hold any attention; it needs a policy that "
                "scores tokens (h2o, snapkv, chunkkv, adakv, reconstruct)"
            )
        preference = dispersion ** (1.0 / self.temperature)
        weights = preference / preference.sum() * dispersion.numel()
        return Targets(mean_budget * ((1.0 - self.share) + self.share * weights))
