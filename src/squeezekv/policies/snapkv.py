"""SnapKV: at prefill, keep the observation window (the last prompt tokens) and the tokens those
queries attend to most (pooled over neighbouring keys); during decode the selected prompt tokens
stay and the rest of the budget slides over the most recent tokens.
"""

import torch
import torch.nn.functional as F

from squeezekv.config import SqueezeConfig
from squeezekv.policies import KEEP, LayerView, Policy, register_policy


@register_policy
class SnapKV(Policy):
    name = "snapkv"
    ranks_by_position = False

    @staticmethod
    def scored_queries(phase: str, query_length: int, config: SqueezeConfig) -> int:
        return min(config.snapkv_window, query_length) if phase == "prefill" else 0

    @staticmethod
    def fold(scores: torch.Tensor, mass: torch.Tensor, phase: str, config: SqueezeConfig) -> torch.Tensor:
        if phase != "prefill":
            return scores
        kernel = config.snapkv_kernel
        pooled = F.max_pool1d(mass.flatten(0, 1).unsqueeze(1), kernel, stride=1, padding=kernel // 2)
        return pooled.view_as(mass)

    @staticmethod
    def priority(view: LayerView, budget: torch.Tensor, config: SqueezeConfig) -> torch.Tensor:
        window_start = view.prompt_columns - config.snapkv_window
        recency = view.positions.to(torch.float32)
        if view.phase == "prefill":
            return torch.where(view.positions >= window_start, KEEP, view.scores)
        return torch.where(view.positions < window_start, KEEP, recency)
