"""The policy contract, the registry, and the selection every policy's ranking goes through."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from squeezekv.components import Component, resolve

KEEP = float("inf")


@dataclass(frozen=True)
class LayerView:
    """What a policy may look at: per slot positions, validity and scores, all ``[batch, heads, slots]``.

    ``heads`` is 1 while every head keeps the same tokens. ``prompt_columns`` is the number of
    columns the prefill covered, ``first_column`` (``[batch]``) each sequence's first real column;
    ``phase`` is ``"prefill"`` or ``"decode"``. ``question_start`` (``[batch]`` columns, or
    ``None`` when the prompt did not say) is where each prompt's question begins.
    """

    positions: torch.Tensor
    valid: torch.Tensor
    scores: torch.Tensor
    phase: str
    prompt_columns: int
    first_column: torch.Tensor
    question_start: torch.Tensor | None = None

    @classmethod
    def stacked(cls, views: list[LayerView]) -> LayerView:
        """``views`` of one phase and prompt as the rows of one batch, in order (so that several
        layers are ranked by one call)."""
        first = views[0]

        def rows(name: str) -> torch.Tensor | None:
            parts = [getattr(view, name) for view in views]
            return None if parts[0] is None else torch.cat(parts)

        return cls(
            rows("positions"),
            rows("valid"),
            rows("scores"),
            first.phase,
            first.prompt_columns,
            rows("first_column"),
            rows("question_start"),
        )

    def question_columns(self) -> torch.Tensor:
        """``[batch, 1, 1]``: the first column of each prompt's question (an error if unknown)."""
        if self.question_start is None:
            raise ValueError(
                "this policy observes the question, but the prompt did not say where its question "
                "starts: pass question_start (the index of each prompt's first question token)"
            )
        return self.question_start.to(self.positions.device).view(-1, 1, 1)

    def newest(self, count: torch.Tensor) -> torch.Tensor:
        """Whether each slot holds one of the newest ``count`` (``[batch, 1, 1]``) valid tokens;
        slots are kept in position order."""
        return self.valid.flip(-1).cumsum(-1).flip(-1) <= count

    def age_rank(self) -> torch.Tensor:
        """0 for the sequence's first real token, 1 for the next, ...: an absolute place, which a
        token keeps even when older tokens leave a sliding window."""
        return self.positions - self.first_column.to(self.positions.device).view(-1, 1, 1)


@dataclass(frozen=True)
class Policy(Component):
    """Base class: keeps the most recent tokens, scores nothing. Subclasses are frozen dataclasses
    whose fields are their settings.

    ``ranks_by_position``: the priority depends on token positions and validity alone (never on
    scores), so layers holding the same tokens with the same budget make the same choice.

    ``adds_mass``: :meth:`fold` is plain addition, so the fast engine may add a decode step's mass
    to the scores inside its attention kernel instead of calling :meth:`fold`. A subclass that
    overrides :meth:`fold` must say whether that still holds by setting ``adds_mass`` itself (checked
    when the class is created), so an override can neither lose nor wrongly keep the fused path.
    """

    kind: ClassVar[str] = "policy"
    ranks_by_position: ClassVar[bool] = True
    adds_mass: ClassVar[bool] = True
    reconstructs: ClassVar[bool] = (
        False  # scores come from a second pass over the prompt (see Session.prefill)
    )

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "fold" in vars(cls) and "adds_mass" not in vars(cls):
            raise TypeError(
                f"policy {cls.__name__} overrides fold, so it must set adds_mass (True only if its "
                "fold is scores + mass, which the fast engine then fuses into its attention kernel)"
            )

    @property
    def observes_question(self) -> bool:
        """Only the queries of each prompt's question score keys (the prompt must say where it starts)."""
        return False

    def min_tokens(self) -> int:
        """The fewest tokens per layer this policy can work with."""
        return 1

    def scored_queries(self, phase: str, query_length: int) -> int:
        """How many trailing queries of this forward contribute attention mass (0: none).

        ``phase`` is ``"prefill"``, ``"decode"`` or, for a policy that ``reconstructs``,
        ``"reconstruct"`` (the second pass over the prompt)."""
        return 0

    def peak_mass(self, phase: str) -> bool:
        """This phase's mass per key is the largest probability any scored query gave it, not the sum."""
        return False

    def fold(self, scores: torch.Tensor, mass: torch.Tensor, phase: str) -> torch.Tensor:
        """New running scores from the old ones and this forward's attention mass per key."""
        return scores + mass

    def priority(self, view: LayerView, budget: torch.Tensor) -> torch.Tensor:
        """Higher keeps; ``KEEP`` always keeps (within the budget). ``budget`` is ``[batch]``.

        Any real dtype: priorities are ranked as float32 (token positions stay exact up to 2**24),
        so the base hands over the positions themselves, and the fast engine's eviction kernel
        casts them as it reads instead of a copy per layer and step."""
        return view.positions

    def newest_kept(self, budget: torch.Tensor) -> torch.Tensor | None:
        """How many newest tokens each sequence always keeps on top of ``priority`` (``[batch]``,
        ``None``: none). Apart from ``priority`` so that the fast engine's eviction kernel applies
        it while it ranks, instead of a pass of its own over the buffer every step."""
        return None

    @property
    def scores_tokens(self) -> bool:
        """Some phase's attention mass reaches the scores (the policy overrides :meth:`scored_queries`);
        a policy that ranks by position alone leaves every score at zero."""
        return type(self).scored_queries is not Policy.scored_queries

    @property
    def spreads_over_heads(self) -> bool:
        """Each key-value head gets its own budget (the policy overrides :meth:`head_budgets`)."""
        return type(self).head_budgets is not Policy.head_budgets

    def head_budgets(self, view: LayerView, budget: torch.Tensor) -> torch.Tensor | None:
        """Tokens each key-value head keeps (``[batch, heads]``) when a policy spreads the layer's
        budget unevenly over its heads, asked at each prefill eviction (the result then stays fixed
        for decode); ``None``: every head keeps ``budget``."""
        return None

    def ranking(self, view: LayerView, budget: torch.Tensor) -> torch.Tensor:
        """The priority with the kept newest tokens raised to ``KEEP``."""
        priority = self.priority(view, budget)
        newest = self.newest_kept(budget)
        if newest is None:
            return priority
        return torch.where(view.newest(newest.to(view.valid.device).view(-1, 1, 1)), KEEP, priority)


POLICIES: dict[str, type[Policy]] = {}


def register_policy(cls: type[Policy]) -> type[Policy]:
    """Class decorator: makes ``cls`` reachable by its ``name`` (in specs, configs and the CLI)."""
    POLICIES[cls.name] = cls
    return cls


def resolve_policy(spec: Policy | str) -> Policy:
    """A policy from an instance, a name (``"h2o"``) or a spec string (``"snapkv:window=64"``)."""
    return resolve(spec, POLICIES, Policy)


def select(
    priority: torch.Tensor, valid: torch.Tensor, keep: torch.Tensor, width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The slots to keep, in their original order, and which of them hold a kept token.

    ``priority`` and ``valid`` are ``[batch, heads, slots]``; ``keep`` is ``[batch]`` tokens per
    sequence. Rows keep different numbers of tokens, so the result is as wide as the largest and
    the surplus slots of other rows are marked invalid. Ties go to the more recent token. ``width``,
    the largest number kept, is worked out here (a host sync) unless the caller knows it. ``keep``
    may also be ``[batch, heads]``: per head.
    """
    slots = priority.shape[-1]
    keep = torch.minimum(keep.to(valid.device).view(valid.shape[0], -1), valid.sum(-1))  # [batch, heads]
    if width is None:
        width = int(keep.max()) if keep.numel() else 0
    ranked = torch.where(valid, priority.to(torch.float32), -torch.inf).flip(-1)
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices[..., :width]
    chosen = slots - 1 - order
    kept = torch.arange(width, device=valid.device) < keep.unsqueeze(-1)
    chosen, permutation = torch.sort(chosen, dim=-1)
    return chosen, kept.gather(-1, permutation)
