"""Sliding window: keep the most recent tokens only."""

from dataclasses import dataclass

from squeezekv.policies.base import Policy, register_policy


@register_policy
@dataclass(frozen=True)
class Window(Policy):
    name = "window"
