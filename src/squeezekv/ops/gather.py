"""The kept slots of many layers gathered at once: an eviction after a prefill keeps, in every
layer, the keys and values of the slots its selection chose. One gather per layer and tensor is
64 launches on a 32-layer model, paced by the host while the GPU waits; the Triton kernel reads
each layer's tensors through a table of their addresses, so that one launch serves every layer
of one shape."""

from __future__ import annotations

import torch

from squeezekv.ops.common import tl, triton, use_triton

if triton is not None:

    @triton.jit
    def _gather_slots(
        SOURCES, TARGETS, CHOSEN, LIKE,
        heads, chosen_heads, slots,
        ssb, ssh, ssn, ssd, stb, sth, stn, scb, sch, scn,
        DIM: tl.constexpr, BLOCK_DIM: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        """One program per (layer, sequence, head) and block of kept slots; ``SOURCES``, ``TARGETS``
        and ``CHOSEN`` hold one address per layer (every layer has the same shapes and strides);
        ``LIKE`` is one of the sources, for its dtype."""
        layer, row, block = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        batch, head = row // heads, row % heads
        element = LIKE.dtype.element_ty
        source = tl.load(SOURCES + layer).to(tl.pointer_type(element))
        target = tl.load(TARGETS + layer).to(tl.pointer_type(element))
        chosen = tl.load(CHOSEN + layer).to(tl.pointer_type(tl.int64))
        kept = block * BLOCK + tl.arange(0, BLOCK)
        inside = kept < slots
        chosen_head = head if chosen_heads > 1 else 0
        index = tl.load(chosen + batch * scb + chosen_head * sch + kept * scn, mask=inside, other=0)
        dims = tl.arange(0, BLOCK_DIM)
        where = inside[:, None] & (dims < DIM)[None, :]
        rows = tl.load(
            source + batch * ssb + head * ssh + index[:, None] * ssn + dims[None, :] * ssd, mask=where
        )
        tl.store(target + batch * stb + head * sth + kept[:, None] * stn + dims[None, :], rows, mask=where)


GATHER_BLOCK = 64  # kept slots a program copies


def gather_slots(states: list[torch.Tensor], chosen: list[torch.Tensor]) -> list[torch.Tensor]:
    """``states[i][b, h, chosen[i][b, h or 0, k]]`` for every layer ``i``: each layer's keys or
    values (``[batch, heads, slots, dim]``) at the slots it keeps (``[batch, heads or 1, kept]``),
    as new contiguous tensors (the old ones can be freed). The kernel serves layers that are all on
    GPUs; a model spread over a GPU and the CPU takes the twin."""
    if not states:
        return []
    gather = gather_slots_triton if all(use_triton(part) for part in states) else gather_slots_torch
    return gather(states, chosen)


def gather_slots_torch(states: list[torch.Tensor], chosen: list[torch.Tensor]) -> list[torch.Tensor]:
    """The torch twin of :func:`gather_slots_triton` (same arguments, same result)."""
    kept = []
    for layer_states, layer_chosen in zip(states, chosen, strict=True):
        batch, heads, _, dim = layer_states.shape
        index = layer_chosen.unsqueeze(-1).expand(batch, heads, -1, dim)
        kept.append(layer_states.gather(2, index))
    return kept


def gather_slots_triton(states: list[torch.Tensor], chosen: list[torch.Tensor]) -> list[torch.Tensor]:
    """The Triton kernel behind :func:`gather_slots`: one launch per set of layers whose tensors
    share shapes, strides, dtype and device (after a prefill: every layer's keys, and every
    layer's values)."""
    kept: list[torch.Tensor | None] = [None] * len(states)
    alike: dict[tuple, list[int]] = {}
    for index, (part, picked) in enumerate(zip(states, chosen, strict=True)):
        key = (part.shape, part.stride(), part.dtype, part.device, picked.shape, picked.stride())
        alike.setdefault(key, []).append(index)
    for indices in alike.values():
        first, first_chosen = states[indices[0]], chosen[indices[0]]
        batch, heads, _, dim = first.shape
        width = first_chosen.shape[-1]
        targets = [first.new_empty(batch, heads, width, dim) for _ in indices]
        for index, target in zip(indices, targets, strict=True):
            kept[index] = target
        if not width:  # nothing kept: nothing to copy
            continue
        addresses = [
            tensor.data_ptr()
            for group in ([states[i] for i in indices], targets, [chosen[i] for i in indices])
            for tensor in group
        ]
        table = torch.tensor(addresses, dtype=torch.int64)
        if first.is_cuda:  # from pinned memory: a copy from pageable memory would wait for the GPU
            table = table.pin_memory().to(first.device, non_blocking=True)
        sources, outputs, picks = table.split(len(indices))
        _gather_slots[(len(indices), batch * heads, triton.cdiv(width, GATHER_BLOCK))](
            sources, outputs, picks, first, heads, first_chosen.shape[1], width,
            *first.stride(), *targets[0].stride()[:3], *first_chosen.stride(),
            DIM=dim, BLOCK_DIM=triton.next_power_of_2(dim), BLOCK=GATHER_BLOCK,
        )  # fmt: skip
    return kept
