"""SnapKV: at prefill, keep the observation window (the last prompt tokens) and the tokens those
queries attend to most (pooled over neighbouring keys); during decode the selected prompt tokens
stay and the rest of the budget slides over the most recent tokens.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from squeezekv.policies.base import KEEP, LayerView, Policy, register_policy


@register_policy
@dataclass(frozen=True)
class SnapKV(Policy):
    """``window``: the observation window, in tokens; ``kernel``: the pooling width (odd)."""

    name = "snapkv"
    ranks_by_position = False
    adds_mass = False  # the prefill's pooled mass replaces the scores; decode scores nothing
    window: int = 32
    kernel: int = 7

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require(self.window >= 1, "window", "an integer >= 1")
        self.require(self.kernel >= 1 and self.kernel % 2 == 1, "kernel", "an odd integer >= 1")

    def scored_queries(self, phase: str, query_length: int) -> int:
        return min(self.window, query_length) if phase == "prefill" else 0

    def fold(self, scores: torch.Tensor, mass: torch.Tensor, phase: str) -> torch.Tensor:
        if phase != "prefill":
            return scores
        pooled = F.max_pool1d(
            mass.flatten(0, 1).unsqueeze(1), self.kernel, stride=1, padding=self.kernel // 2
        )
        return pooled.view_as(mass)

    def priority(self, view: LayerView, budget: torch.Tensor) -> torch.Tensor:
        window_start = view.prompt_columns - self.window
        recency = view.positions.to(torch.float32)
        if view.phase == "prefill":
            return torch.where(view.positions >= window_start, KEEP, view.scores)
        return torch.where(view.positions < window_start, KEEP, recency)
