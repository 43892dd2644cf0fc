"""squeezekv's entry in transformers' attention interface: attention over the compressed cache.

Its own module so that the families whose attention forward is replaced (``architectures``) and
the session that routes a model's attention here both import it, neither importing the other.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface

IMPLEMENTATION = "squeezekv"
OWNER_ATTRIBUTE = "_squeezekv_owner"  # set on each attention module: the object whose ``cache`` serves it


def squeezekv_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface entry: attention over this layer's compressed cache."""
    owner = getattr(module, OWNER_ATTRIBUTE, None)
    if owner is None or owner.cache is None:
        raise RuntimeError("squeezekv attention called outside squeezekv.compress(...)")
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    output = owner.cache.attention(module.layer_idx, query, key, value, scaling, softcap, sliding_window)
    return output.transpose(1, 2).contiguous(), None


AttentionInterface.register(IMPLEMENTATION, squeezekv_attention)
