"""squeezekv's KV caches: one contract, two storages.

:class:`SqueezeCache` (``dynamic``) grows and shrinks its tensors every forward and serves any
forward (prefill in chunks, multi-token continuations, ``model.generate``); :class:`StaticCache`
(``static``) holds each layer in a fixed buffer of its budget plus one slot, for the fast engine's
single-token decode steps. A layer whose heads keep different numbers of tokens (a head-wise
policy) is stored packed in both (``ragged``: :class:`RaggedLayer`, :class:`RaggedStaticLayer`).
"""

from squeezekv.cache.base import CompressedCache
from squeezekv.cache.dynamic import SqueezeCache, SqueezeLayer
from squeezekv.cache.ragged import RaggedLayer, RaggedStaticLayer
from squeezekv.cache.static import StaticCache, StaticLayer

__all__ = [
    "CompressedCache",
    "RaggedLayer",
    "RaggedStaticLayer",
    "SqueezeCache",
    "SqueezeLayer",
    "StaticCache",
    "StaticLayer",
]
