"""Configuration of a compression run: a budget, a policy and an allocator, validated when built."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, fields

import torch

from squeezekv.allocators import Allocator, resolve_allocator
from squeezekv.policies import Policy, resolve_policy


@dataclass(frozen=True)
class SqueezeConfig:
    """What to keep in the KV cache.

    ``budget`` is the average number of cached tokens per layer:

    - a ``float`` in (0, 1) is a fraction of each sequence's prompt length;
    - exactly ``1.0`` keeps everything: the prompt and every new token, never evicting (the output
      is ``model.generate``'s);
    - an ``int`` >= 1 is an absolute number of tokens per layer.

    NumPy numbers count as the Python ones. ``policy`` chooses which tokens a layer keeps
    (sequence-wise), ``allocator`` how the total is split across layers (layer-wise); each is an
    instance, a name or a spec string (``"squeeze:p=0.5,groups=3"``), resolved once, here, to an
    instance that owns and checks its own settings.
    """

    budget: float | int
    policy: Policy | str = "h2o"
    allocator: Allocator | str = "squeeze"

    def __post_init__(self) -> None:
        budget = self.budget
        if isinstance(budget, numbers.Integral) and not isinstance(budget, bool):
            budget = int(budget)
        elif isinstance(budget, numbers.Real) and not isinstance(budget, bool):
            budget = float(budget)
        else:
            raise ValueError(f"budget must be a float fraction in (0, 1] or an int >= 1, got {budget!r}")
        if isinstance(budget, float) and not 0.0 < budget <= 1.0:
            raise ValueError(
                f"budget {budget!r} is a fraction of the prompt and must lie in (0, 1]; "
                "pass an int for an absolute number of tokens per layer"
            )
        if isinstance(budget, int) and budget < 1:
            raise ValueError(f"budget {budget!r} must be >= 1 token per layer")
        object.__setattr__(self, "budget", budget)
        object.__setattr__(self, "policy", resolve_policy(self.policy))
        object.__setattr__(self, "allocator", resolve_allocator(self.allocator))
        if isinstance(budget, int):
            self.check_tokens_per_layer(budget)

    @classmethod
    def build(
        cls,
        budget: float | int,
        policy: Policy | str = "h2o",
        allocator: Allocator | str = "squeeze",
        **settings: int | float,
    ) -> SqueezeConfig:
        """A config whose policy and allocator take ``settings``, each routed to whichever of the
        two has that field (``p=0.5`` to squeeze, ``sinks=2`` to streaming)."""
        policy, allocator = resolve_policy(policy), resolve_allocator(allocator, settings)
        owners = {part: {field.name for field in fields(part)} for part in (policy, allocator)}
        unknown = [name for name in settings if not any(name in names for names in owners.values())]
        if unknown:
            accepted = ", ".join(
                f"{part.kind} {part.name!r}: {sorted(names) or 'none'}" for part, names in owners.items()
            )
            raise ValueError(
                f"no setting {unknown[0]!r} in the chosen policy or allocator; settings ({accepted})"
            )
        policy, allocator = (
            part.replace(**{name: value for name, value in settings.items() if name in names})
            for part, names in owners.items()
        )
        return cls(budget, policy, allocator)

    @property
    def is_fraction(self) -> bool:
        return isinstance(self.budget, float)

    @property
    def keeps_everything(self) -> bool:
        """``budget == 1.0``: no eviction at all, prompt and new tokens alike."""
        return self.budget == 1.0 and self.is_fraction

    def to_dict(self) -> dict:
        """JSON-able: the budget and each part's name and settings."""
        return {"budget": self.budget, "policy": self.policy.to_dict(), "allocator": self.allocator.to_dict()}

    def tokens_per_layer(self, prompt_tokens: int, new_tokens: int = 0) -> int:
        """The average per-layer budget, in tokens, for a prompt of ``prompt_tokens`` real tokens
        followed by ``new_tokens`` (which only a keep-everything budget counts)."""
        if self.keeps_everything:
            return prompt_tokens + new_tokens
        if self.is_fraction:
            tokens = max(1, int(self.budget * prompt_tokens))
            self.check_tokens_per_layer(tokens, prompt_tokens)
            return tokens
        return int(self.budget)

    def check_tokens_per_layer(self, tokens: int, prompt_tokens: int | None = None) -> None:
        floor = self.policy.min_tokens()
        if tokens < floor:
            where = f" ({self.budget} of a {prompt_tokens}-token prompt)" if prompt_tokens else ""
            settings = ", ".join(f"{name}={value}" for name, value in self.policy.settings().items())
            raise ValueError(
                f"budget of {tokens} tokens per layer{where} is too small for policy "
                f"{self.policy.name!r}{f' ({settings})' if settings else ''}, which needs at least {floor}"
            )

    def plan_budgets(
        self,
        similarity: torch.Tensor,
        prompt_tokens: torch.Tensor,
        sliding_windows: list[int | None],
        max_new_tokens: int = 0,
    ) -> torch.Tensor:
        """``[batch, layers]`` budgets: each sequence is planned on its own prompt and similarities.

        A layer can hold at most the prompt plus the tokens still to come (and no more than its
        sliding window), which is what a keep-everything budget gives every layer; the floor is the
        policy's minimum.
        """
        floor = self.policy.min_tokens()
        rows = []
        for row, tokens in zip(similarity, prompt_tokens.tolist(), strict=True):
            reachable = tokens + max_new_tokens
            caps = torch.tensor(
                [reachable if w is None else min(reachable, max(1, w - 1)) for w in sliding_windows]
            )
            if self.keeps_everything:
                rows.append(caps)
            else:
                rows.append(self.allocator.allocate(row, self.tokens_per_layer(tokens), floor, caps))
        return torch.stack(rows)
