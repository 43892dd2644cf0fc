"""Attention over a compressed cache in torch, optionally returning the attention mass each key
received: the twin both Triton attention pairs (:mod:`~squeezekv.ops.prefill`,
:mod:`~squeezekv.ops.decode`) are checked against.

Each layer holds a different set of tokens, so the mask is built per layer from the cached
tokens' columns and validity instead of from the model's one shared mask. ``attend`` is SDPA when
no scores are needed, explicit softmax in query chunks when they are (so H2O and SnapKV work on
SDPA models without an eager pass over the whole model).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from squeezekv.ops.common import use_triton

SCORE_CHUNK_ELEMENTS = 1 << 26  # logits per query chunk while scoring (256 MiB in float32)


def fused(query: torch.Tensor, softcap: float | None, explicit: bool) -> bool:
    """Whether the Triton attention kernels serve this query: :func:`~squeezekv.ops.use_triton`,
    a power-of-two head size >= 16, 16- or 32-bit floats (they accumulate in float32, which would
    round a float64 model), no softcap, and not an eager-attention model (whose plain path computes
    as eager attention does)."""
    dim = query.shape[-1]
    floats = (torch.float16, torch.bfloat16, torch.float32)
    shaped = dim >= 16 and dim & (dim - 1) == 0 and query.dtype in floats
    return use_triton(query) and shaped and softcap is None and not explicit


def layer_mask(
    key_positions: torch.Tensor,
    key_valid: torch.Tensor,
    query_columns: torch.Tensor,
    sliding_window: int | None,
) -> torch.Tensor:
    """``[batch, heads, queries, keys]`` booleans: which cached key each query may attend to.

    A key is visible if it is a real token at or before the query's column (and inside the
    sliding window, if any). Every query sees its own key, so rows of padding queries are never
    empty; no real query can see a padding key.
    """
    keys, queries = key_positions[:, :, None, :], query_columns[None, None, :, None]
    allowed = key_valid[:, :, None, :] & (keys <= queries)
    if sliding_window is not None:
        allowed &= keys > queries - sliding_window
    return allowed | (keys == queries)


def attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    scored_queries: int = 0,
    query_valid: torch.Tensor | None = None,
    softcap: float | None = None,
    explicit: bool = False,
    peak: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention output ``[batch, q_heads, queries, dim]`` and, when ``scored_queries > 0``, the
    attention mass ``[batch, kv_heads, keys]`` that the last ``scored_queries`` real queries gave
    each key (summed over the query heads that share it; with ``peak``, the largest probability
    any of those queries and heads gave it).

    ``key``/``value`` have ``kv_heads`` heads (grouped-query attention), ``mask`` has 1 or
    ``kv_heads`` heads; ``None`` means plainly causal, the queries being the last keys (a fresh
    prompt without padding, which SDPA's fastest kernels then serve). ``explicit`` forces the
    softmax path everywhere (as eager attention does); otherwise only the scored queries take it.
    """
    queries, keys = query.shape[2], key.shape[2]
    split = 0 if explicit or softcap is not None else queries - scored_queries
    if mask is None and split == queries == keys:
        return _sdpa(query, key, value, None, scaling), None
    if mask is None:
        mask = causal_mask(queries, keys, query.device)
    if split == queries:
        return _sdpa(query, key, value, mask, scaling), None
    weight = torch.zeros(query.shape[0], queries - split, dtype=torch.float32, device=query.device)
    if scored_queries:
        weight[:, weight.shape[1] - scored_queries :] = 1.0
        if query_valid is not None:
            weight *= query_valid[:, split:].to(weight.device, torch.float32)
    tail, mass = _explicit(
        query[:, :, split:], key, value, mask[:, :, split:], scaling, softcap, weight, peak
    )
    if split == 0:
        return tail, (mass if scored_queries else None)
    head = _sdpa(query[:, :, :split], key, value, mask[:, :, :split], scaling)
    return torch.cat([head, tail], dim=2), mass


def causal_mask(queries: int, keys: int, device: torch.device) -> torch.Tensor:
    """``[1, 1, queries, keys]``: query ``i`` sees keys up to ``i + keys - queries``."""
    rows = torch.arange(keys - queries, keys, device=device)[:, None]
    return (torch.arange(keys, device=device) <= rows)[None, None]


def _sdpa(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    group = query.shape[1] // key.shape[1]
    if group > 1 and mask is not None and mask.shape[1] > 1:
        mask = mask.repeat_interleave(group, 1)  # per-head masks follow the query heads; keys are not copied
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=scaling, is_causal=mask is None, enable_gqa=group > 1
    )


def _explicit(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    scaling: float,
    softcap: float | None,
    row_weight: torch.Tensor,
    peak: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention in query chunks; the mass is the ``row_weight``-weighted sum (``peak``:
    maximum) of each key's attention probability over queries and the query heads of its group.

    The query heads sharing a key head are stacked as extra rows (``[batch, kv_heads, group *
    queries, dim]``), so keys and values are read once and never copied per query head. Logits are
    computed in the inputs' precision and normalised in float32, as eager attention does.
    """
    batch, q_heads, queries, dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    group = q_heads // kv_heads
    rows_query = query.reshape(batch, kv_heads, group, queries, dim)
    mask = mask.unsqueeze(2)  # [batch, 1 or kv_heads, 1, queries, keys]
    keys_t = key.transpose(-1, -2)
    output = torch.empty(
        batch, kv_heads, group, queries, value.shape[-1], dtype=value.dtype, device=value.device
    )
    mass = torch.zeros(batch, kv_heads, keys, dtype=torch.float32, device=key.device)
    chunk = max(1, SCORE_CHUNK_ELEMENTS // max(1, batch * q_heads * keys))
    for start in range(0, queries, chunk):
        rows = slice(start, min(start + chunk, queries))
        block = rows_query[:, :, :, rows]
        width = block.shape[3]
        logits = (block.reshape(batch, kv_heads, group * width, dim) @ keys_t).view(
            batch, kv_heads, group, width, keys
        )
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) * scaling
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        probs = torch.softmax(logits.masked_fill(~mask[:, :, :, rows], float("-inf")), dim=-1)
        attended = probs.to(value.dtype).reshape(batch, kv_heads, group * width, keys) @ value
        output[:, :, :, rows] = attended.view(batch, kv_heads, group, width, -1)
        if peak:
            weighted = probs.float() * row_weight[:, None, None, rows, None]
            mass = torch.maximum(mass, weighted.amax(dim=(2, 3)))
        else:
            mass += torch.einsum("bhgqk,bq->bhk", probs.float(), row_weight[:, rows])
    return output.view(batch, q_heads, queries, -1), mass
