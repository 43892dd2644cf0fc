"""Configuration of a compression run: a budget, a policy and an allocator, validated when built."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from squeezekv.allocators import Allocator, resolve_allocator
from squeezekv.allocators.precision import PrecisionAllocator
from squeezekv.ops.quantize import KEY_GROUP_TOKENS, check_bits, check_group, tokens_within, window_error
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

    ``kv_bits`` (16, 8 or 4) is the precision the cache stores keys and values at, once the prompt
    is planned (:mod:`squeezekv.cache.quantized`); 16 is the model's own dtype, untouched. With
    ``equal_bytes``, ``budget`` counts 16-bit tokens' bytes and a quantized layer keeps as many
    tokens as fit in them once its residual window's unquantized tokens are paid for
    (:func:`~squeezekv.ops.quantize.tokens_within`: 1.85x the rest at 8 bits and 3.44x at 4 for
    heads of 40; a budget the window alone would take is refused). A precision allocator
    (``squeeze-bits``) plans each layer's bits itself, its budget always in 16-bit bytes, and wants
    ``kv_bits`` left at 16 and runs on the simple path only; a fixed ``kv_bits`` runs on both
    engines. Quantized caches do not run with policies that give each head its own budget.
    ``kv_group`` (16, 32, 64 or 128) is how many tokens share a key's scale and zero, and so how
    many of the newest tokens wait unquantized: a smaller group costs more scale bytes a token and
    a cheaper residual window, which pays at small budgets.
    """

    budget: float | int
    policy: Policy | str = "h2o"
    allocator: Allocator | str = "squeeze"
    kv_bits: int = 16
    equal_bytes: bool = False
    kv_group: int = KEY_GROUP_TOKENS

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
        if self.allocator.reads_dispersion and not self.policy.scores_tokens:
            raise ValueError(
                f"allocator {self.allocator.name!r} plans from the attention scores the policy keeps, but "
                f"policy {self.policy.name!r} scores nothing: it needs a scoring policy (h2o, snapkv, "
                "chunkkv, adakv, reconstruct)"
            )
        self.check_precision()

    def check_precision(self) -> None:
        """Refuses a ``kv_bits``, ``equal_bytes`` or ``kv_group`` out of range, and what quantized caches
        cannot do."""
        object.__setattr__(self, "kv_bits", integral(self.kv_bits, check_bits))
        object.__setattr__(self, "kv_group", integral(self.kv_group, check_group))
        if not isinstance(self.equal_bytes, bool):
            raise ValueError(f"equal_bytes={self.equal_bytes!r} must be True or False")
        if isinstance(self.allocator, PrecisionAllocator) and self.kv_bits != 16:
            raise ValueError(
                f"kv_bits={self.kv_bits} with allocator {self.allocator.name!r}, which plans each layer's "
                "bits itself (its settings low_bits, high_bits): leave kv_bits at 16"
            )
        if self.plans_bits and self.policy.spreads_over_heads:
            raise ValueError(
                f"policy {self.policy.name!r} gives each head its own budget, which quantized caches do not "
                f"support (kv_bits={self.kv_bits}, allocator {self.allocator.name!r}): use kv_bits=16 and "
                "an allocator that plans no bits"
            )

    @property
    def plans_bits(self) -> bool:
        """Whether the cache is quantized: ``kv_bits`` below 16, or an allocator that plans bits."""
        return self.kv_bits < 16 or isinstance(self.allocator, PrecisionAllocator)

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
        names = ("kv_bits", "equal_bytes", "kv_group")
        precision = {name: settings.pop(name) for name in names if name in settings}
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
        return cls(budget, policy, allocator, **precision)

    @property
    def is_fraction(self) -> bool:
        return isinstance(self.budget, float)

    @property
    def keeps_everything(self) -> bool:
        """``budget == 1.0``: no eviction at all, prompt and new tokens alike."""
        return self.budget == 1.0 and self.is_fraction

    def to_dict(self) -> dict:
        """JSON-able: the budget, each part's name and settings, and the precision when quantized
        (its key group only when not the default, so that earlier records read the same)."""
        precision = {"kv_bits": self.kv_bits, "equal_bytes": self.equal_bytes} if self.plans_bits else {}
        if self.plans_bits and self.kv_group != KEY_GROUP_TOKENS:
            precision["kv_group"] = self.kv_group
        return {
            "budget": self.budget,
            "policy": self.policy.to_dict(),
            "allocator": self.allocator.to_dict(),
            **precision,
        }

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
        head_dims: tuple[int, int] | None = None,
        dispersion: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[batch, layers]`` budgets: each sequence is planned on its own prompt and similarities.

        A layer can hold at most the prompt plus the tokens still to come (and no more than its
        sliding window), which is what a keep-everything budget gives every layer; the floor is the
        policy's minimum. A budget in 16-bit bytes (``equal_bytes``, a precision allocator) becomes
        tokens at each layer's bits through the keys' and values' ``head_dims``. An allocator that
        ``reads_dispersion`` plans from ``dispersion`` (``[batch, layers]``, the prefill cache's
        :meth:`~squeezekv.cache.SqueezeCache.score_dispersion`) instead of the similarities.
        """
        if self.allocator.reads_dispersion and not self.keeps_everything:
            if dispersion is None:
                raise ValueError(
                    f"allocator {self.allocator.name!r} plans from the layers' score dispersion after a "
                    "prefill: pass dispersion to plan_budgets"
                )
            similarity = dispersion
        in_bytes = self.equal_bytes and self.kv_bits < 16 or isinstance(self.allocator, PrecisionAllocator)
        if in_bytes and head_dims is None and not self.keeps_everything:
            raise ValueError("a budget in bytes needs the head sizes: pass head_dims to plan_budgets")
        floor = self.policy.min_tokens()
        rows = []
        for row, tokens in zip(similarity, prompt_tokens.tolist(), strict=True):
            reachable = tokens + max_new_tokens
            caps = torch.tensor(
                [reachable if w is None else min(reachable, max(1, w - 1)) for w in sliding_windows]
            )
            mean = self.tokens_per_layer(tokens)
            if self.keeps_everything:
                rows.append(caps)
            elif isinstance(self.allocator, PrecisionAllocator):
                rows.append(self.allocator.plan_tokens(row, mean, floor, caps, head_dims, self.kv_group))
            else:
                if in_bytes:  # the cost is affine in the tokens: any split of the mean costs the same
                    bits = torch.tensor([float(self.kv_bits)])
                    quantized = int(
                        tokens_within(torch.tensor([float(mean)]), bits, head_dims, self.kv_group)
                    )
                    if quantized < max(floor, 1):
                        raise window_error(mean, self.kv_bits, self.kv_group)
                    mean = quantized
                rows.append(self.allocator.allocate(row, mean, floor, caps))
        return torch.stack(rows)

    def plan_bits(self, similarity: torch.Tensor) -> torch.Tensor | None:
        """``[batch, layers]`` bits each layer stores each sequence at (``None``: all 16, untouched)."""
        if not self.plans_bits:
            return None
        if isinstance(self.allocator, PrecisionAllocator):
            return torch.stack([self.allocator.layer_bits(row.double().cpu()) for row in similarity])
        return torch.full(similarity.shape, self.kv_bits, dtype=torch.int64)


def integral(value: object, check: Callable[[object], int]) -> int:
    """``value`` through ``check`` (which names it in its error), a NumPy integer as a Python one."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return check(int(value))
    return check(value)
