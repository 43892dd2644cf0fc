"""Layer-wise allocators: how a total KV budget is split across layers.

An allocator turns per-layer similarities (or, if it ``reads_dispersion``, the spread of each
layer's prefill scores) into real-valued per-layer targets summing to ``num_layers * mean_budget``,
and may name the layers that absorb any adjustment first; :meth:`Allocator.allocate` then makes them
whole token counts within each layer's floor and cap, sharing overflow equally and keeping the
total. Adding an allocator is one small module: a frozen dataclass of its settings, decorated with
:func:`register_allocator`. Every module of this package is imported (so registered) below: a new
file needs no other edit (``blend.py``, ``cake.py``, ``squeeze_lowest.py`` and ``squeeze_random.py``
were added so); the original three are also exported by name.
"""

import importlib
import pkgutil

from squeezekv.allocators.base import (
    ALLOCATORS,
    Allocator,
    Targets,
    conserve,
    register_allocator,
    resolve_allocator,
)
from squeezekv.allocators.pyramid import Pyramid
from squeezekv.allocators.squeeze import Squeeze
from squeezekv.allocators.uniform import Uniform

__all__ = [
    "ALLOCATORS",
    "Allocator",
    "Pyramid",
    "Squeeze",
    "Targets",
    "Uniform",
    "conserve",
    "register_allocator",
    "resolve_allocator",
]

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
