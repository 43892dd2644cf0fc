"""The strongest static-cache ``model.generate`` we can build on grouped-query shapes.

transformers 5.24's SDPA integration (``transformers/integrations/sdpa_attention.py``) runs a
one-token decode step on the key-value heads (``pack_gqa``: the query heads of a group become the
query rows) only when it is *not* being compiled; under ``torch.compile``, which the static cache
uses, it falls back to ``repeat_kv`` and copies every key and value ``num_key_value_groups`` times
each step. :func:`packed_gqa_under_compile` lifts that condition, and nothing else, for as long as
its block runs: the module's ``is_torchdynamo_compiling`` answers ``False``, so the compiled decode
takes the same ``pack_gqa`` branch the eager decode takes (mathematically the same attention).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def packed_gqa_under_compile() -> Iterator[None]:
    """Inside the block, transformers' SDPA attention decodes grouped-query heads with ``pack_gqa``
    even while compiled. Compiled graphs are dropped on entry and exit, so none traced under the
    patch outlives it and none traced before it is reused inside."""
    from transformers.integrations import sdpa_attention

    original = getattr(sdpa_attention, "is_torchdynamo_compiling", None)
    if original is None or not hasattr(sdpa_attention, "pack_gqa"):
        raise RuntimeError(
            "this transformers' integrations/sdpa_attention.py has no is_torchdynamo_compiling / "
            "pack_gqa: the hf_static_gqa baseline is written for transformers 5.24"
        )
    torch._dynamo.reset()
    sdpa_attention.is_torchdynamo_compiling = lambda: False
    try:
        yield
    finally:
        sdpa_attention.is_torchdynamo_compiling = original
        torch._dynamo.reset()
