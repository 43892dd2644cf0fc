"""The compute squeezekv adds to a model: each op one function that runs its Triton kernel where
:func:`use_triton` holds (a GPU tensor, Triton installed) and its torch twin otherwise.

| op | what it does |
|---|---|
| :func:`prefill_attention` | attention over a layer's cached tokens plus each key's attention mass |
| :func:`decode_attention` | one decode query over the fast engine's unordered or packed buffer, plus mass |
| :func:`evict_lowest` | the fast engine's eviction of a row's lowest-priority token |
| :func:`gather_slots` | every layer's kept keys and values after an eviction, in one launch |
| :func:`write_slot` | the fast engine's write of a new token into its free slot |
| :func:`residual_cosine` | layer importance's cosine per token |
| :func:`paged_decode_attention` | one decode query over each row's blocks of the serving pool, plus mass |
| :func:`write_paged_slot` | the serving batch's write of a new token into the pool |
| :func:`quantized_decode_attention` | one decode query over a quantized layer's packed codes, plus mass |
"""

from squeezekv.ops.attention import attend, layer_mask
from squeezekv.ops.common import use_triton
from squeezekv.ops.cosine import residual_cosine
from squeezekv.ops.decode import decode_attention
from squeezekv.ops.eviction import evict_lowest
from squeezekv.ops.gather import gather_slots
from squeezekv.ops.paged import paged_decode_attention, write_paged_slot
from squeezekv.ops.prefill import prefill_attention
from squeezekv.ops.quantized_decode import quantized_decode_attention
from squeezekv.ops.slots import write_slot

__all__ = [
    "attend",
    "decode_attention",
    "evict_lowest",
    "gather_slots",
    "layer_mask",
    "paged_decode_attention",
    "prefill_attention",
    "quantized_decode_attention",
    "residual_cosine",
    "use_triton",
    "write_paged_slot",
    "write_slot",
]
