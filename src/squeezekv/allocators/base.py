"""The allocator contract, the registry, and the rounding that makes targets whole token counts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import numpy as np
import torch
from torch import nn

from squeezekv.components import Component, resolve


class Targets(NamedTuple):
    """Real-valued per-layer budgets; overflow and deficits go to ``adjustable`` layers first."""

    values: torch.Tensor
    adjustable: torch.Tensor | None = None


@dataclass(frozen=True)
class Allocator(Component):
    """Base class: splits a total budget across layers. Subclasses are frozen dataclasses whose
    fields are their settings, and implement :meth:`targets`.

    ``reads_dispersion``: the per-layer signal :meth:`targets` and :meth:`allocate` receive is how
    widely each layer's prefill attention spreads over the prompt
    (:meth:`~squeezekv.cache.SqueezeCache.score_dispersion`, in (0, 1]; 0 where a layer's scores hold
    nothing) instead of the cosine similarity. The cache measures it only for such an allocator,
    which therefore needs a policy that scores tokens.
    """

    kind: ClassVar[str] = "allocator"
    reads_dispersion: ClassVar[bool] = False

    def check_model(self, model: nn.Module) -> None:
        """Refuses a model this allocator cannot plan for (one measured on another model); any
        model by default. Called when a session starts."""

    def targets(self, similarity: torch.Tensor, mean_budget: int) -> Targets:
        """Real-valued per-layer targets summing to ``layers * mean_budget`` from one sequence's
        per-layer similarities, or dispersions (``reads_dispersion``) (float64, on the host)."""
        raise NotImplementedError

    def allocate(
        self, similarity: torch.Tensor, mean_budget: int, floor: int, caps: torch.Tensor
    ) -> torch.Tensor:
        """Per-layer token budgets (int64, one per layer) for one sequence.

        ``similarity`` holds one value per layer (a dispersion if the allocator ``reads_dispersion``),
        ``caps`` the most tokens each layer can hold. The result lies within ``[min(floor, cap),
        cap]`` per layer and sums to ``num_layers * mean_budget`` whenever the caps allow it (never
        more).
        """
        targets, adjustable = self.targets(similarity.double().cpu(), mean_budget)
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


ALLOCATORS: dict[str, type[Allocator]] = {}


def register_allocator(cls: type[Allocator]) -> type[Allocator]:
    """Class decorator: makes ``cls`` reachable by its ``name`` (in specs, configs and the CLI)."""
    ALLOCATORS[cls.name] = cls
    return cls


def resolve_allocator(spec: Allocator | str, settings: dict | None = None) -> Allocator:
    """An allocator from an instance, a name (``"squeeze"``) or a spec string (``"squeeze:p=0.5"``);
    ``settings`` it has override the spec's (``oracle`` with ``profile`` from a flag)."""
    return resolve(spec, ALLOCATORS, Allocator, settings)


def conserve(targets: torch.Tensor, total: float, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Whole numbers within ``[lo, hi]`` summing to ``total``, as close as possible to ``targets``.

    The same amount is added to (or taken from) every layer not at a bound, so overflow from a
    capped layer is shared equally by the others; fractions go to the largest remainders, ties to
    the lower layer index. (NumPy: a few dozen values, where torch's per-call cost would dominate.)
    """
    targets, lo, hi = (t.numpy() for t in (targets, lo, hi))
    total = max(float(lo.sum()), min(float(total), float(hi.sum())))
    low, high = shift_bracket(targets, lo, hi, total)
    while low < (shift := (low + high) / 2) < high:  # bisection, down to adjacent floats
        if filled(targets, lo, hi, shift) < total:
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


def filled(targets: np.ndarray, lo: np.ndarray, hi: np.ndarray, shift: float | np.ndarray) -> np.ndarray:
    """What the layers hold in all when every target moves by ``shift`` within its bounds; for a
    column of shifts (``[shifts, 1]``), one total each."""
    return np.minimum(np.maximum(targets + shift, lo), hi).sum(-1)


def shift_bracket(targets: np.ndarray, lo: np.ndarray, hi: np.ndarray, total: float) -> tuple[float, float]:
    """Where :func:`conserve`'s bisection starts: a narrow bracket around the shift that fills
    ``total`` (:func:`filled` is linear between the shifts at which a layer meets a bound, so the
    crossing is found exactly there first), or the whole range when the check of that bracket
    fails. The bisection ends on the same shift from either: the least float whose fill reaches
    ``total`` (a float sum of terms that never decrease never decreases), after a few dozen sums
    instead of a hundred."""
    low, high = float((lo - targets).min()), float((hi - targets).max())
    bends = np.unique(np.concatenate([lo - targets, hi - targets]))
    fills = filled(targets, lo, hi, bends[:, None])
    past = int(np.searchsorted(fills, total))  # the first bend that fills total
    if past == 0 or past == len(bends):
        return low, high
    before, after = bends[past - 1], bends[past]
    root = before + (total - fills[past - 1]) * (after - before) / (fills[past] - fills[past - 1])
    margin = 1e-12 * max(1.0, abs(root), total)  # well above the sums' rounding
    narrow_low, narrow_high = max(low, root - margin), min(high, root + margin)
    if filled(targets, lo, hi, narrow_high) >= total and (
        narrow_low == low or filled(targets, lo, hi, narrow_low) < total
    ):
        return narrow_low, narrow_high
    return low, high
