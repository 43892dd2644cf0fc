"""H2O: heavy hitters by attention mass accumulated over every query so far, plus a recent window.

The recent window is ``recent_ratio`` of the layer's budget (at least one token, so the newest
token is never dropped before it has been attended to).
"""

import torch

from squeezekv.config import SqueezeConfig
from squeezekv.policies import LayerView, Policy, register_policy


def recent_tokens(budget: torch.Tensor, config: SqueezeConfig) -> torch.Tensor:
    return torch.minimum(budget, (budget * config.recent_ratio).floor().long().clamp(min=1))


@register_policy
class H2O(Policy):
    name = "h2o"
    ranks_by_position = False

    @staticmethod
    def scored_queries(phase: str, query_length: int, config: SqueezeConfig) -> int:
        return query_length

    @staticmethod
    def priority(view: LayerView, budget: torch.Tensor, config: SqueezeConfig) -> torch.Tensor:
        return view.scores

    @staticmethod
    def newest_kept(budget: torch.Tensor, config: SqueezeConfig) -> torch.Tensor:
        return recent_tokens(budget, config)
