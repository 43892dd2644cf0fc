"""Query-agnostic scores from reconstructing the prompt (KVzip's idea, arXiv 2505.23416).

A score taken from the prompt's last queries (SnapKV) favours what *that* question needs; a
question asked after compression, the multi-turn case, finds the rest gone. Here the prefill is
followed by a second pass that feeds the prompt again: to repeat it, the model must look back at
the tokens that carry its content, and the attention mass those repeating queries give each
original token is its score. The second pass's own keys are then dropped. It costs a second
prefill over twice the keys (the bench reports it); at decode the kept prompt tokens are ranked by
that score and the new tokens are kept newest first.

Settings: ``score`` is how the repeating queries' attention becomes a key's score: ``"max"``, the
largest probability any query head gave it (KVzip's rule: a token one step of the repeat needs is
kept however little the rest look at it), or ``"sum"``, the total mass; ``chunk`` ranks spans of
that many tokens by their summed score, as ChunkKV does; ``window`` always keeps the prompt's last
tokens (where a question asked in the prompt sits).
"""

from dataclasses import dataclass

import torch

from squeezekv.policies.base import KEEP, LayerView, Policy, register_policy
from squeezekv.policies.chunk import chunk_totals


@register_policy
@dataclass(frozen=True)
class Reconstruct(Policy):
    name = "reconstruct"
    ranks_by_position = False
    adds_mass = False  # the second pass's mass replaces the scores; nothing else scores
    reconstructs = True
    score: str = "sum"
    chunk: int = 1
    window: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require(self.score in ("max", "sum"), "score", "'max' or 'sum'")
        self.require(self.chunk >= 1, "chunk", "an integer >= 1")
        self.require(self.window >= 0, "window", "an integer >= 0")

    def peak_mass(self, phase: str) -> bool:
        return phase == "reconstruct" and self.score == "max"

    def scored_queries(self, phase: str, query_length: int) -> int:
        return query_length if phase == "reconstruct" else 0

    def fold(self, scores: torch.Tensor, mass: torch.Tensor, phase: str) -> torch.Tensor:
        return mass if phase == "reconstruct" else scores

    def priority(self, view: LayerView, budget: torch.Tensor) -> torch.Tensor:
        scores = chunk_totals(view, self.chunk) if self.chunk > 1 else view.scores
        return torch.where(view.positions >= view.prompt_columns - self.window, KEEP, scores)
