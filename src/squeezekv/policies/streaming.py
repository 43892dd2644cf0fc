"""StreamingLLM: the first ``sinks`` tokens, which soak up attention, plus the most recent ones."""

import torch

from squeezekv.config import SqueezeConfig
from squeezekv.policies import KEEP, LayerView, Policy, register_policy


@register_policy
class Streaming(Policy):
    name = "streaming"

    @staticmethod
    def min_tokens(config: SqueezeConfig) -> int:
        return config.sinks + 1

    @staticmethod
    def priority(view: LayerView, budget: torch.Tensor, config: SqueezeConfig) -> torch.Tensor:
        recency = view.positions.to(torch.float32)
        return torch.where(view.age_rank() < config.sinks, KEEP, recency)
