"""SnapKV: at prefill, keep the observation window and the tokens its queries attend to most (pooled
over neighbouring keys); during decode the selected prompt tokens stay and the rest of the budget
slides over the most recent tokens.

The observation window is the last ``window`` prompt tokens, or with ``window=0`` each prompt's
question, measured per prompt from where it starts. In a chat prompt the last 32 tokens are mostly
the template's closing tokens and the answer prefix; the question itself is what says which
context tokens matter.

Each key-value head keeps the tokens its own query heads attend to (``heads="own"``, SnapKV's
rule). With ``heads="shared"`` every head of a layer keeps the same tokens, ranked by the mass of
all query heads: a fact one head's queries overlook is still kept whole by the others' choice.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from squeezekv.policies.base import KEEP, LayerView, Policy, register_policy


@register_policy
@dataclass(frozen=True)
class SnapKV(Policy):
    """``window``: the observation window in tokens (0: the question, wherever it starts);
    ``kernel``: the pooling width (odd); ``heads``: ``"own"`` or ``"shared"`` token choices."""

    name = "snapkv"
    ranks_by_position = False
    adds_mass = False  # the prefill's pooled mass replaces the scores; decode scores nothing
    window: int = 32
    kernel: int = 7
    heads: str = "own"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require(self.window >= 0, "window", "an integer >= 1, or 0 for the question")
        self.require(self.kernel >= 1 and self.kernel % 2 == 1, "kernel", "an odd integer >= 1")
        self.require(self.heads in ("own", "shared"), "heads", "'own' or 'shared'")

    @property
    def observes_question(self) -> bool:
        return self.window == 0

    def scored_queries(self, phase: str, query_length: int) -> int:
        if phase != "prefill":
            return 0
        return query_length if self.observes_question else min(self.window, query_length)

    def fold(self, scores: torch.Tensor, mass: torch.Tensor, phase: str) -> torch.Tensor:
        if phase != "prefill":
            return scores
        mass = pooled(mass, self.kernel)
        if self.heads == "shared":
            return mass.mean(1, keepdim=True).expand_as(mass).contiguous()
        return mass

    def window_start(self, view: LayerView) -> torch.Tensor | int:
        """The first column of the observation window (``[batch, 1, 1]`` for the question)."""
        return view.question_columns() if self.observes_question else view.prompt_columns - self.window

    def priority(self, view: LayerView, budget: torch.Tensor) -> torch.Tensor:
        window_start = self.window_start(view)
        if view.phase == "prefill":
            return torch.where(view.positions >= window_start, KEEP, view.scores)
        return torch.where(view.positions < window_start, KEEP, view.positions)  # float32, as KEEP is


def pooled(mass: torch.Tensor, kernel: int) -> torch.Tensor:
    """``mass`` (``[batch, heads, keys]``) max-pooled over ``kernel`` neighbouring keys."""
    flat = mass.flatten(0, 1).unsqueeze(1)
    return F.max_pool1d(flat, kernel, stride=1, padding=kernel // 2).view_as(mass)
