"""Layer-wise allocators: how a total KV budget is split across layers.

An allocator turns per-layer similarities into real-valued per-layer targets summing to
``num_layers * mean_budget``, and may name the layers that absorb any adjustment first;
:meth:`Allocator.allocate` then makes them whole token counts within each layer's floor and cap,
sharing overflow equally and keeping the total. Adding an allocator is one small module: a frozen
dataclass of its settings, decorated with :func:`register_allocator` and imported below.
"""

from squeezekv.allocators.base import (
    ALLOCATORS,
    Allocator,
    Targets,
    conserve,
    register_allocator,
    resolve_allocator,
)
from squeezekv.allocators.blend import Blend
from squeezekv.allocators.pyramid import Pyramid
from squeezekv.allocators.squeeze import Squeeze
from squeezekv.allocators.squeeze_lowest import SqueezeLowest
from squeezekv.allocators.squeeze_random import SqueezeRandom
from squeezekv.allocators.uniform import Uniform

__all__ = [
    "ALLOCATORS",
    "Allocator",
    "Blend",
    "Pyramid",
    "Squeeze",
    "SqueezeLowest",
    "SqueezeRandom",
    "Targets",
    "Uniform",
    "conserve",
    "register_allocator",
    "resolve_allocator",
]
