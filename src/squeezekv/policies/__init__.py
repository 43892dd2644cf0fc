"""Sequence-wise policies: which tokens a layer keeps when it must shrink to its budget.

A policy ranks a layer's cached tokens; :func:`select` keeps the best-ranked ones. Policies that
rank by attention ask for the attention mass of the last ``scored_queries`` queries of a forward
and fold it into the layer's running scores. Adding a policy is one small module: a frozen
dataclass of its settings, decorated with :func:`register_policy`. Every module of this package is imported
(so registered) below: a new file needs no other edit; the built-in ones are also exported by name.
"""

import importlib
import pkgutil

from squeezekv.policies.base import (
    KEEP,
    POLICIES,
    LayerView,
    Policy,
    register_policy,
    resolve_policy,
    select,
)
from squeezekv.policies.h2o import H2O
from squeezekv.policies.snapkv import SnapKV
from squeezekv.policies.streaming import Streaming
from squeezekv.policies.window import Window

__all__ = [
    "H2O",
    "KEEP",
    "POLICIES",
    "LayerView",
    "Policy",
    "SnapKV",
    "Streaming",
    "Window",
    "register_policy",
    "resolve_policy",
    "select",
]

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
