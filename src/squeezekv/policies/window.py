"""Sliding window: keep the most recent tokens only."""

from squeezekv.policies import Policy, register_policy


@register_policy
class Window(Policy):
    name = "window"
