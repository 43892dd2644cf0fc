"""H2O: heavy hitters by attention mass accumulated over every query so far, plus a recent window.

The recent window is ``recent_ratio`` of the layer's budget (at least one token, so the newest
token is never dropped before it has been attended to).
"""

from dataclasses import dataclass

import torch

from squeezekv.policies.base import LayerView, Policy, register_policy


@register_policy
@dataclass(frozen=True)
class H2O(Policy):
    name = "h2o"
    ranks_by_position = False
    recent_ratio: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require(0.0 <= self.recent_ratio <= 1.0, "recent_ratio", "in [0, 1]")

    def scored_queries(self, phase: str, query_length: int) -> int:
        return query_length

    def priority(self, view: LayerView, budget: torch.Tensor) -> torch.Tensor:
        return view.scores

    def newest_kept(self, budget: torch.Tensor) -> torch.Tensor:
        return torch.minimum(budget, (budget * self.recent_ratio).floor().long().clamp(min=1))
