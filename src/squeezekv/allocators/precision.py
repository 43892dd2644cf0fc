"""The third dimension: layers get different key-value precisions, from the same cosine signal.

``squeeze-bits`` clusters layers as ``squeeze`` does; the squeezed group (highest similarity: the
layers whose attention changes the residual least) is stored at ``low_bits`` and the others at
``high_bits``. Tokens and bits are planned together under one byte budget: the budget ``b`` counts
16-bit tokens, so a plan may spend ``L * b`` 16-bit tokens' bytes; a layer's share of them (``p *
b`` for the squeezed group, the rest shared by the others, as in ``squeeze``; ``p = 1``: every
layer the same bytes) buys as many tokens as fit at its bits once its residual window is paid
for (:func:`~squeezekv.ops.quantize.cost_in_16bit_tokens`, scales counted). A budget whose
windows alone would take it is refused. Bits are planned per sequence like
budgets; the cache stores each sequence's rows of a layer at that sequence's bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from squeezekv.allocators.base import Allocator, conserve, register_allocator
from squeezekv.allocators.squeeze import Squeeze
from squeezekv.ops.quantize import BITS, KEY_GROUP_TOKENS, cost_in_16bit_tokens, tokens_within, window_error


@dataclass(frozen=True)
class PrecisionAllocator(Allocator):
    """An allocator that also plans each layer's bits: ``layer_bits``, and token budgets through
    ``plan_tokens`` (a budget of 16-bit bytes) instead of :meth:`Allocator.allocate`."""

    def layer_bits(self, similarity: torch.Tensor) -> torch.Tensor:
        """Bits per layer (int64) from one sequence's per-layer similarities."""
        raise NotImplementedError

    def allocate(self, similarity, mean_budget, floor, caps) -> torch.Tensor:
        raise ValueError(
            f"allocator {self.name!r} plans bytes and bits, not tokens alone: plan through "
            "SqueezeConfig.plan_budgets with head_dims (the simple path)"
        )

    def plan_tokens(
        self,
        similarity: torch.Tensor,
        mean_budget: int,
        floor: int,
        caps: torch.Tensor,
        head_dims: tuple[int, int],
        group: int = KEY_GROUP_TOKENS,
    ) -> torch.Tensor:
        """Per-layer tokens whose bytes at :meth:`layer_bits` (key groups of ``group`` tokens) stay
        within ``layers * mean_budget`` 16-bit tokens' bytes, each within ``[min(floor, cap), cap]``."""
        similarity = similarity.double().cpu()
        bits = self.layer_bits(similarity).double()
        caps = caps.to(torch.float64).cpu()
        floors = torch.minimum(torch.full_like(caps, float(floor)), caps)
        targets, _ = self.targets(similarity, mean_budget)  # in 16-bit tokens' bytes
        budget = float(mean_budget * similarity.numel())

        def cost(tokens: torch.Tensor) -> torch.Tensor:
            return cost_in_16bit_tokens(tokens, bits, head_dims, group)

        if float(cost(floors).sum()) > budget:
            raise window_error(mean_budget, int(bits.min()), group)
        spent = conserve(targets, budget, cost(floors), cost(caps)).double()
        tokens = torch.maximum(torch.minimum(tokens_within(spent, bits, head_dims, group), caps), floors)
        while float(cost(tokens).sum()) > budget + 1e-9:  # rounding overshot: trim the largest
            room = torch.where(tokens > floors, cost(tokens), -1.0)
            if float(room.max()) < 0:
                break  # the floors alone exceed the budget, as with any allocator
            tokens[int(room.argmax())] -= 1
        return tokens.to(torch.int64)


@register_allocator
@dataclass(frozen=True)
class SqueezeBits(Squeeze, PrecisionAllocator):
    """``low_bits`` for the squeezed group, ``high_bits`` for the others; ``p``: the squeezed
    group's share of the mean byte budget (1: equal bytes per layer); ``groups`` as in squeeze."""

    name = "squeeze-bits"
    p: float = 1.0
    low_bits: int = 4
    high_bits: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        allowed = f"one of {', '.join(map(str, BITS))}"
        self.require(self.low_bits in BITS, "low_bits", allowed)
        self.require(self.high_bits in BITS, "high_bits", allowed)
        self.require(self.low_bits <= self.high_bits, "low_bits", f"<= high_bits ({self.high_bits})")

    def layer_bits(self, similarity: torch.Tensor) -> torch.Tensor:
        squeezed = self.squeezed_layers(similarity)
        if bool(squeezed.all()):  # one cluster: nothing to tell the layers apart
            squeezed = torch.zeros_like(squeezed)
        return torch.where(squeezed, self.low_bits, self.high_bits).to(torch.int64)
