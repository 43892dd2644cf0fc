"""ChunkKV: SnapKV's scores, but whole spans are kept or dropped together.

A five-digit number is five tokens in many tokenizers, a name or a code line several: ranking
tokens one by one keeps "524" of "52445". Here the prompt is cut into chunks of ``chunk``
consecutive tokens (counted from each sequence's first real token) and every token of a chunk
gets the chunk's summed score, so the selection takes chunks best first (only the last one taken
can be cut by the budget). The observation window and the decode rule are SnapKV's.
"""

from dataclasses import dataclass

import torch

from squeezekv.policies.base import KEEP, LayerView, register_policy
from squeezekv.policies.snapkv import SnapKV


@register_policy
@dataclass(frozen=True)
class ChunkKV(SnapKV):
    """``chunk``: tokens per span; ``window`` and ``kernel`` as SnapKV's (no pooling by default:
    the chunk sum already spreads a peak over its neighbours)."""

    name = "chunkkv"
    kernel: int = 1
    chunk: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require(self.chunk >= 1, "chunk", "an integer >= 1")

    def priority(self, view: LayerView, budget: torch.Tensor) -> torch.Tensor:
        if view.phase != "prefill":
            return super().priority(view, budget)
        return torch.where(view.positions >= self.window_start(view), KEEP, chunk_totals(view, self.chunk))


def chunk_totals(view: LayerView, chunk: int) -> torch.Tensor:
    """Every slot's score replaced by the sum over its chunk of ``chunk`` consecutive tokens,
    counted from the sequence's first real token (``[batch, heads, slots]``)."""
    chunks = max(view.prompt_columns, 0) // chunk + 1
    # left padding has ranks < 0 and is never valid; columns past the prompt join the last chunk
    index = (view.age_rank() // chunk).clamp(0, chunks - 1)
    scores = torch.where(view.valid, view.scores, 0.0)
    index = index.expand_as(scores)
    totals = scores.new_zeros(*scores.shape[:-1], chunks).scatter_add_(-1, index, scores)
    return totals.gather(-1, index)
