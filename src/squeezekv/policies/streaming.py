"""StreamingLLM: the first ``sinks`` tokens, which soak up attention, plus the most recent ones."""

from dataclasses import dataclass

import torch

from squeezekv.policies.base import KEEP, LayerView, Policy, register_policy


@register_policy
@dataclass(frozen=True)
class Streaming(Policy):
    name = "streaming"
    sinks: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require(self.sinks >= 0, "sinks", "an integer >= 0")

    def min_tokens(self) -> int:
        return self.sinks + 1

    def priority(self, view: LayerView, budget: torch.Tensor) -> torch.Tensor:
        return torch.where(view.age_rank() < self.sinks, KEEP, view.positions)  # float32, as KEEP is
