"""Configuration of a compression run, validated when it is built."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SqueezeConfig:
    """What to keep in the KV cache.

    ``budget`` is the average number of cached tokens per layer. A ``float`` in (0, 1] is a fraction
    of each sequence's prompt length; an ``int`` >= 1 is an absolute token count. ``policy`` chooses
    which tokens a layer keeps (sequence-wise), ``allocator`` how the total is split across layers
    (layer-wise). The remaining fields tune one policy or allocator each.
    """

    budget: float | int
    policy: str = "h2o"
    allocator: str = "squeeze"
    p: float = 0.35
    groups: int = 3
    sinks: int = 4
    recent_ratio: float = 0.5
    snapkv_window: int = 32
    snapkv_kernel: int = 7
    pyramid_beta: float = 20.0

    def __post_init__(self) -> None:
        from squeezekv.allocators import ALLOCATORS
        from squeezekv.policies import POLICIES

        budget = self.budget
        if isinstance(budget, bool) or not isinstance(budget, (int, float)):
            raise ValueError(f"budget must be a float fraction in (0, 1] or an int >= 1, got {budget!r}")
        if isinstance(budget, float) and not 0.0 < budget <= 1.0:
            raise ValueError(
                f"budget {budget!r} is a fraction of the prompt and must lie in (0, 1]; "
                "pass an int for an absolute number of tokens per layer"
            )
        if isinstance(budget, int) and budget < 1:
            raise ValueError(f"budget {budget!r} must be >= 1 token per layer")
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; choose one of {sorted(POLICIES)}")
        if self.allocator not in ALLOCATORS:
            raise ValueError(f"unknown allocator {self.allocator!r}; choose one of {sorted(ALLOCATORS)}")
        if not 0.0 < self.p <= 1.0:
            raise ValueError(f"p {self.p!r} must lie in (0, 1]")
        if isinstance(self.groups, bool) or not isinstance(self.groups, int) or self.groups < 2:
            raise ValueError(f"groups {self.groups!r} must be an int >= 2")
        if self.sinks < 0:
            raise ValueError(f"sinks {self.sinks!r} must be >= 0")
        if not 0.0 <= self.recent_ratio <= 1.0:
            raise ValueError(f"recent_ratio {self.recent_ratio!r} must lie in [0, 1]")
        if self.snapkv_window < 1 or self.snapkv_kernel < 1 or self.snapkv_kernel % 2 == 0:
            raise ValueError(
                f"snapkv_window {self.snapkv_window!r} must be >= 1 and snapkv_kernel "
                f"{self.snapkv_kernel!r} an odd number >= 1"
            )
        if self.pyramid_beta <= 1.0:
            raise ValueError(f"pyramid_beta {self.pyramid_beta!r} must be > 1")
        if isinstance(budget, int):
            self.check_tokens_per_layer(budget)

    @property
    def is_fraction(self) -> bool:
        return isinstance(self.budget, float)

    def tokens_per_layer(self, prompt_tokens: int) -> int:
        """The average per-layer budget, in tokens, for a prompt of ``prompt_tokens`` real tokens."""
        if self.is_fraction:
            tokens = max(1, int(self.budget * prompt_tokens))
            self.check_tokens_per_layer(tokens, prompt_tokens)
            return tokens
        return int(self.budget)

    def check_tokens_per_layer(self, tokens: int, prompt_tokens: int | None = None) -> None:
        from squeezekv.policies import POLICIES

        floor = POLICIES[self.policy].min_tokens(self)
        if tokens < floor:
            where = f" ({self.budget} of a {prompt_tokens}-token prompt)" if prompt_tokens else ""
            raise ValueError(
                f"budget of {tokens} tokens per layer{where} is too small for policy {self.policy!r}, "
                f"which needs at least {floor} (sinks={self.sinks} + 1 recent token)"
            )

    def check_layers(self, num_layers: int) -> None:
        """Checks the options that depend on the model's depth."""
        if self.groups > num_layers:
            raise ValueError(f"groups {self.groups} exceeds the model's {num_layers} layers")
