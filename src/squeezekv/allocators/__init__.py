"""Layer-wise allocators: how a total KV budget is split across layers.

An allocator is a pure function that turns per-layer similarities into real-valued per-layer
targets summing to ``num_layers * mean_budget``, and may name the layers that absorb any
adjustment first. :func:`allocate` then makes them whole token counts within each layer's floor
and cap, sharing overflow equally and keeping the total.
Adding an allocator is one small module that calls :func:`register_allocator`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from squeezekv.config import SqueezeConfig


class Targets(NamedTuple):
    """Real-valued per-layer budgets; overflow and deficits go to ``adjustable`` layers first."""

    values: torch.Tensor
    adjustable: torch.Tensor | None = None


AllocatorFn = Callable[[torch.Tensor, int, SqueezeConfig], Targets]
ALLOCATORS: dict[str, AllocatorFn] = {}


def register_allocator(name: str) -> Callable[[AllocatorFn], AllocatorFn]:
    def add(fn: AllocatorFn) -> AllocatorFn:
        ALLOCATORS[name] = fn
        return fn

    return add


def allocate(
    similarity: torch.Tensor, mean_budget: int, floor: int, caps: torch.Tensor, config: SqueezeConfig
) -> torch.Tensor:
    """Per-layer token budgets (int64, one per layer) for one sequence.

    ``similarity`` holds one value per layer, ``caps`` the most tokens each layer can hold. The
    result lies within ``[min(floor, cap), cap]`` per layer and sums to ``num_layers * mean_budget``
    whenever the caps allow it (never more).
    """
    targets, adjustable = ALLOCATORS[config.allocator](similarity.double().cpu(), mean_budget, config)
    caps = caps.to(torch.float64).cpu()
    floors = torch.minimum(torch.full_like(caps, float(floor)), caps)
    total = min(float(mean_budget * similarity.numel()), float(caps.sum()))
    if adjustable is not None and bool(adjustable.any()):
        fixed = targets.clamp(floors, caps)
        first = conserve(
            targets, total, torch.where(adjustable, floors, fixed), torch.where(adjustable, caps, fixed)
        )
        if int(first.sum()) == round(total):
            return first
    return conserve(targets, total, floors, caps)


def conserve(targets: torch.Tensor, total: float, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Whole numbers within ``[lo, hi]`` summing to ``total``, as close as possible to ``targets``.

    The same amount is added to (or taken from) every layer not at a bound, so overflow from a
    capped layer is shared equally by the others; fractions go to the largest remainders, ties to
    the lower layer index. (NumPy: a few dozen values, where torch's per-call cost would dominate.)
    """
    targets, lo, hi = (t.numpy() for t in (targets, lo, hi))
    total = max(float(lo.sum()), min(float(total), float(hi.sum())))
    low, high = float((lo - targets).min()), float((hi - targets).max())
    while low < (shift := (low + high) / 2) < high:  # bisection, down to adjacent floats
        if float(np.clip(targets + shift, lo, hi).sum()) < total:
            low = shift
        else:
            high = shift
    real = np.clip(targets + high, lo, hi)
    whole = np.clip(np.floor(real), lo, hi)
    missing = int(round(total - float(whole.sum())))
    if missing > 0:
        room = whole < hi
        remainder = np.where(room, real - whole, -1.0)
        order = sorted(range(len(real)), key=lambda i: (-float(remainder[i]), i))
        for i in [i for i in order if room[i]][:missing]:
            whole[i] += 1
    return torch.from_numpy(whole).to(torch.int64)


def plan_budgets(
    similarity: torch.Tensor,
    prompt_tokens: torch.Tensor,
    config: SqueezeConfig,
    sliding_windows: list[int | None],
    max_new_tokens: int = 0,
) -> torch.Tensor:
    """``[batch, layers]`` budgets: each sequence is planned on its own prompt and similarities.

    A layer can hold at most the prompt plus the tokens still to come (and no more than its
    sliding window); the floor is the policy's minimum.
    """
    from squeezekv.policies import POLICIES

    floor = POLICIES[config.policy].min_tokens(config)
    rows = []
    for row, tokens in zip(similarity, prompt_tokens.tolist(), strict=True):
        reachable = tokens + max_new_tokens
        caps = torch.tensor(
            [reachable if w is None else min(reachable, max(1, w - 1)) for w in sliding_windows]
        )
        rows.append(allocate(row, config.tokens_per_layer(tokens), floor, caps, config))
    return torch.stack(rows)


from squeezekv.allocators import pyramid, squeeze, uniform  # noqa: E402,F401  (registers them)
