"""Ada-KV (arXiv 2407.11550): SnapKV's scores, with a layer's budget spread over its key-value heads.

SnapKV gives every head the same number of tokens, though some heads attend to a few tokens and
others to many. Ada-KV takes, per sequence, the best-scored tokens over all heads of the layer at
once (``heads x budget`` in all, the observation window kept in every head), so a head whose
attention is spread keeps more and a concentrated head less. A safeguard keeps in every head at
least ``floor`` of the per-head share of what may be selected beyond the window. Each head's
budget is fixed after prefill; decode then behaves as SnapKV in every head: its selected prompt
tokens stay and the rest of its own budget slides over the newest tokens.
"""

from dataclasses import dataclass

import torch

from squeezekv.policies.base import KEEP, LayerView, register_policy
from squeezekv.policies.snapkv import SnapKV


@register_policy
@dataclass(frozen=True)
class AdaKV(SnapKV):
    """``window`` and ``kernel`` as SnapKV's; ``floor``: the fraction of the per-head average share
    that every head keeps at least (1 gives every head the same budget, as SnapKV does)."""

    name = "adakv"
    floor: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require(0.0 <= self.floor <= 1.0, "floor", "in [0, 1]")

    def head_budgets(self, view: LayerView, budget: torch.Tensor) -> torch.Tensor | None:
        """Per head, the window plus the head's share of the layer's jointly selected tokens; the
        layer's budget for every head where nothing beyond the window has to go (it all fits) or
        nothing beyond it may stay (the window fills the budget). ``None`` where every head keeps
        ``budget`` (one head, or ``floor`` = 1)."""
        shape = view.scores.shape
        if view.phase != "prefill" or shape[1] == 1:
            return None
        valid = view.valid.expand(shape)
        in_window = (self.priority(view, budget) == KEEP).expand(shape)  # SnapKV's observation window
        candidate = valid & ~in_window
        budget = budget.to(valid.device).view(-1, 1)
        window_held = (valid & in_window).sum(-1)
        spare = (budget - window_held).clamp(min=0)  # [batch, heads]: what each head may add on average
        scores = torch.where(candidate, view.scores.float(), -torch.inf)
        floor = (spare * self.floor).floor().long()
        guaranteed = candidate & (rank(scores) < floor.unsqueeze(-1))
        shared = spare.sum(-1, keepdim=True) - guaranteed.sum((-2, -1)).unsqueeze(-1)  # [batch, 1]
        rest = torch.where(guaranteed, -torch.inf, scores).flatten(1)
        joint = (rest > -torch.inf) & (rank(rest) < shared)
        chosen = guaranteed.sum(-1) + joint.view(shape).sum(-1)
        uniform = (candidate.sum(-1) <= spare).all(-1, keepdim=True) | (spare == 0).all(-1, keepdim=True)
        spread = torch.where(uniform, budget, window_held + chosen)
        return None if bool((spread == budget).all()) else spread


def rank(scores: torch.Tensor) -> torch.Tensor:
    """Each element's place along the last dimension, sorted from the highest score (0: the best)."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    places = torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, places)
