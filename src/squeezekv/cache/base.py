"""The contract every squeezekv cache keeps, whatever its storage."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from transformers.cache_utils import Cache


class CompressedCache(Cache, ABC):
    """A transformers :class:`Cache` whose layers are compressed to per-layer budgets.

    The model's attention reaches it through :meth:`attention` (see :mod:`squeezekv.attention`);
    :class:`~squeezekv.generation.GenerationStats` reads the rest. ``budgets`` (``[batch, layers]``
    tokens) and ``prompt_tokens`` (``[batch]``) are set once the prompt has been planned.
    """

    budgets: torch.Tensor | None
    prompt_tokens: torch.Tensor | None

    @abstractmethod
    def attention(
        self,
        layer_idx: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scaling: float,
        softcap: float | None,
        sliding_window: int | None,
    ) -> torch.Tensor:
        """Attention of this forward's queries (``[batch, q_heads, queries, dim]``) over layer
        ``layer_idx``, which :meth:`update` has just given this forward's keys and values; scores
        the keys and evicts as the policy asks."""

    @abstractmethod
    def held_tokens(self) -> torch.Tensor:
        """``[batch, layers]``: the tokens each layer really holds for each sequence (on the host)."""

    @abstractmethod
    def kv_bytes_kept(self) -> int:
        """Bytes of keys and values the cache's tensors hold."""

    @abstractmethod
    def kv_bytes_full(self) -> int:
        """Bytes a plain cache would hold for every column seen, in every layer."""
