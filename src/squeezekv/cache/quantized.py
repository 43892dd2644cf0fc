"""A compressed layer whose keys and values are stored as packed integer codes (``kv_bits`` 8 or 4).

Layout (KIVI's, arXiv 2402.02750, adapted to a cache that evicts single tokens):

- every slot holds packed codes for its key and its value (:mod:`squeezekv.ops.quantize`);
- a value's float16 scale and zero are per token (per group of channels), stored with its slot;
- a key's scale and zero are per channel, shared by a *group* of up to ``group_tokens`` (the
  config's ``kv_group``, 64 by default) consecutive kept tokens of one (sequence, head); a group is
  a range of columns, stored as its first column, so a slot finds its group by its column (no
  per-slot index);
- the newest tokens wait unquantized in a residual window, indexed by column: once
  ``group_tokens`` columns have arrived, the ones still kept are quantized as a new group.

A kept token is quantized once and never again: eviction gathers codes and value scales, and drops
the key groups none of whose tokens is left (each (sequence, head) renumbers its own groups).
Rows of a batch may be stored at different precisions (a precision allocator plans per
sequence); each precision is one :class:`PackedRows` over its rows, 16 bits storing the model's
dtype as is.

A one-token decode step attends over the codes themselves (:meth:`PackedStates.decode_attention`:
:func:`~squeezekv.ops.quantized_decode_attention` once per precision, whose Triton kernel
dequantizes in registers). Prefill and multi-token forwards, and the torch twin, read a transient
full-precision copy of the whole layer, made by :meth:`PackedStates.states` for the forward and
dropped after it: the stored cache is packed, the transient is one layer.
"""

from __future__ import annotations

import torch

from squeezekv.ops import quantized_decode_attention
from squeezekv.ops.quantize import (
    KEY_GROUP_TOKENS,
    SCALE_DTYPE,
    quantize_key_groups,
    quantize_values,
    value_group,
)
from squeezekv.ops.quantized_decode import PackedCodes, residual_laid_out, with_residual

NO_GROUP = -1  # the first column of a group slot that no group uses (they come first in a head)


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def empty_window(states: torch.Tensor) -> torch.Tensor:
    """An empty residual window shaped like ``states``: a new tensor, not a view of them (a view
    keeps their storage, the full-precision layer, alive)."""
    return states.new_empty(*states.shape[:2], 0, states.shape[-1])


def unquantized_bytes(batch: int, heads: int, seen: int, dims: tuple[int, int], dtype: torch.dtype) -> int:
    """Bytes the unquantized keys and values of ``seen`` columns would take."""
    return batch * heads * seen * sum(dims) * dtype.itemsize


class PackedRows:
    """The rows ``rows`` of a layer at ``bits``: ``[rows, heads, slots, ...]`` codes (the states
    themselves at 16 bits), value scales and zeros per slot, key scales and zeros per group and
    each group's first column, ascending; a head with fewer groups than the widest starts with
    unused ones (``NO_GROUP``, scale 0)."""

    def __init__(self, rows: torch.Tensor, bits: int, heads: int, dims: tuple[int, int], like: torch.Tensor):
        self.rows, self.bits, self.heads, self.dims = rows, bits, heads, dims
        self.dtype = like.dtype  # not a view of ``like``: it would keep its storage alive
        batch, device = rows.numel(), like.device
        self.key_codes, self.value_codes = self.slots(dims[0], 0), self.slots(dims[1], 0)
        value_groups = dims[1] // value_group(dims[1])
        self.value_scale = torch.zeros(batch, heads, 0, value_groups, dtype=SCALE_DTYPE, device=device)
        self.value_zero = self.value_scale.clone()
        self.key_scale = torch.zeros(batch, heads, 0, dims[0], dtype=SCALE_DTYPE, device=device)
        self.key_zero = self.key_scale.clone()
        self.group_start = torch.zeros(batch, heads, 0, dtype=torch.int32, device=device)

    def slots(self, dim: int, count: int) -> torch.Tensor:
        """``count`` empty slots of codes for ``dim`` channels (of states, at 16 bits)."""
        shape = (self.rows.numel(), self.heads, count)
        if self.bits == 16:
            return torch.zeros(*shape, dim, dtype=self.dtype, device=self.rows.device)
        return torch.zeros(*shape, dim * self.bits // 8, dtype=torch.uint8, device=self.rows.device)

    def add_slots(self, count: int) -> None:
        self.key_codes = torch.cat([self.key_codes, self.slots(self.dims[0], count)], 2)
        self.value_codes = torch.cat([self.value_codes, self.slots(self.dims[1], count)], 2)
        extra = self.value_scale.new_zeros(*self.value_scale.shape[:2], count, self.value_scale.shape[-1])
        self.value_scale = torch.cat([self.value_scale, extra], 2)
        self.value_zero = torch.cat([self.value_zero, extra], 2)

    def group_of(self, positions: torch.Tensor) -> torch.Tensor:
        """Each slot's key group (``[rows, heads, slots]``): the last one starting at or before its column."""
        columns = positions.to(torch.int32).contiguous()
        return (torch.searchsorted(self.group_start, columns, right=True).long() - 1).clamp(min=0)

    def quantize(
        self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, chosen: torch.Tensor,
        held: torch.Tensor, group_tokens: int,
    ) -> None:  # fmt: skip
        """Quantizes the ``chosen`` slots (``[rows, heads, slots]``, all later than every group so
        far) from their full-precision ``keys`` and ``values``, as new groups of up to
        ``group_tokens`` tokens in column order; then keeps only the groups that some ``held``
        slot uses."""
        mask = chosen.unsqueeze(-1)
        if self.bits == 16:
            self.key_codes = torch.where(mask, keys, self.key_codes)
            self.value_codes = torch.where(mask, values, self.value_codes)
            return
        rank = chosen.long().cumsum(-1) - 1  # slots are in column order
        group = torch.where(chosen, rank // group_tokens, -1)
        count = int(group.max()) + 1 if group.numel() else 0
        if count == 0:
            return
        used = self.used_groups(positions, held & ~chosen)
        codes, scale, zero = quantize_key_groups(keys, group, count, self.bits)
        self.key_codes = torch.where(mask, codes, self.key_codes)
        last = torch.iinfo(torch.int32).max
        starts = torch.full((*group.shape[:2], count + 1), last, dtype=torch.int64, device=group.device)
        index = torch.where(group >= 0, group, count)
        starts = starts.scatter_reduce(2, index, positions.long(), "amin")[..., :count]
        self.group_start = torch.cat([self.group_start, starts.to(torch.int32)], 2)
        self.key_scale = torch.cat([self.key_scale, scale], 2)
        self.key_zero = torch.cat([self.key_zero, zero], 2)
        self.compact(torch.cat([used, starts != last], -1))
        codes, scale, zero = quantize_values(values, self.bits)
        self.value_codes = torch.where(mask, codes, self.value_codes)
        self.value_scale = torch.where(mask, scale, self.value_scale)
        self.value_zero = torch.where(mask, zero, self.value_zero)

    def keep(self, chosen: torch.Tensor) -> None:
        """Keeps the ``chosen`` slots (``[rows, heads, kept]``); codes are moved, never recomputed."""

        def gather(states: torch.Tensor) -> torch.Tensor:
            return states.gather(2, chosen.unsqueeze(-1).expand(*chosen.shape, states.shape[-1]))

        self.key_codes, self.value_codes = gather(self.key_codes), gather(self.value_codes)
        self.value_scale, self.value_zero = gather(self.value_scale), gather(self.value_zero)

    def used_groups(self, positions: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
        """``[rows, heads, groups]``: the groups some ``quantized`` slot (``[rows, heads, slots]``) is in."""
        groups = self.group_start.shape[-1]
        if groups == 0:
            return quantized.new_zeros(*quantized.shape[:2], 0)
        group = torch.where(quantized, self.group_of(positions), groups)
        used = torch.zeros(*group.shape[:2], groups + 1, dtype=torch.bool, device=group.device)
        return used.scatter(2, group, True)[..., :groups]

    def compact(self, used: torch.Tensor) -> None:
        """Keeps the ``used`` groups (``[rows, heads, groups]``), right-aligned per head: unused
        group slots first (``NO_GROUP``, scale 0), so that first columns stay ascending when new
        groups are added after them."""
        counts = used.sum(-1, keepdim=True)
        width = int(counts.max())
        target = torch.where(used, width - counts + used.long().cumsum(-1) - 1, width)

        def moved(part: torch.Tensor, fill) -> torch.Tensor:
            shape = (*part.shape[:2], width + 1, *part.shape[3:])
            index = target.view(*target.shape, *[1] * (part.dim() - 3)).expand_as(part)
            return part.new_full(shape, fill).scatter(2, index, part)[:, :, :width].contiguous()

        self.group_start = moved(self.group_start, NO_GROUP)
        self.key_scale, self.key_zero = moved(self.key_scale, 0), moved(self.key_zero, 0)

    def codes(self, positions: torch.Tensor) -> PackedCodes:
        """The slots as the ops read them, each slot's key group found from its column (``positions``)."""
        group = None if self.bits == 16 or self.group_start.shape[-1] == 0 else self.group_of(positions)
        return PackedCodes(
            self.bits, self.key_codes, self.key_scale, self.key_zero, group, self.value_codes,
            self.value_scale, self.value_zero,
        )  # fmt: skip

    def states(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Every slot's keys and values decoded to ``dtype``."""
        return self.codes(positions).states(dtype)

    def nbytes(self) -> int:
        parts = [self.key_codes, self.value_codes]
        if self.bits != 16:
            parts += [self.value_scale, self.value_zero, self.key_scale, self.key_zero, self.group_start]
        return nbytes(*parts)


class PackedStates:
    """The keys and values of a :class:`~squeezekv.cache.dynamic.SqueezeLayer` whose rows keep
    ``bits`` (``[batch]``: 16, 8 or 4 per sequence), packed (see the module); the layer keeps the
    columns and validity of its slots and passes them in. Built from the layer's full-precision
    ``keys`` and ``values``, whose ``held`` slots it quantizes in key groups of ``group_tokens``; its
    residual window starts empty at column ``seen``."""

    def __init__(
        self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, held: torch.Tensor,
        seen: int, bits: torch.Tensor, group_tokens: int = KEY_GROUP_TOKENS,
    ) -> None:  # fmt: skip
        self.dtype, self.heads = keys.dtype, keys.shape[1]
        self.dims = (keys.shape[-1], values.shape[-1])
        if 4 in bits.tolist() and (self.dims[0] % 2 or self.dims[1] % 2):
            raise ValueError(
                f"kv_bits=4 packs two channels a byte and needs even head sizes, not {self.dims}"
            )
        self.residual_start, self.group_tokens = seen, group_tokens
        self.residual_keys, self.residual_values = empty_window(keys), empty_window(values)
        bits = bits.to(keys.device)
        self.parts = [
            PackedRows(torch.nonzero(bits == value).view(-1), value, self.heads, self.dims, keys)
            for value in sorted(set(bits.tolist()))
        ]
        for part in self.parts:
            part.add_slots(keys.shape[2])
        self.quantize(keys, values, self.per_head(positions), self.per_head(held), self.per_head(held))

    def per_head(self, tracked: torch.Tensor) -> torch.Tensor:
        """A ``[batch, 1 or heads, slots]`` record of the layer, per head."""
        return tracked.expand(-1, self.heads, -1)

    def quantize(
        self, keys: torch.Tensor, values: torch.Tensor, columns: torch.Tensor, chosen: torch.Tensor,
        held: torch.Tensor,
    ) -> None:  # fmt: skip
        """Quantizes the ``chosen`` slots, then drops the key groups no ``held`` slot uses."""
        for part in self.parts:
            rows = part.rows
            part.quantize(
                keys[rows], values[rows], columns[rows], chosen[rows], held[rows], self.group_tokens
            )

    def store(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """The new tokens wait in the residual window; their slots get empty codes."""
        self.residual_keys = torch.cat([self.residual_keys, key_states], 2)
        self.residual_values = torch.cat([self.residual_values, value_states], 2)
        for part in self.parts:
            part.add_slots(key_states.shape[2])

    def states(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The transient full-precision keys and values of every slot (see the module)."""
        columns = self.per_head(positions)
        keys = self.residual_keys.new_empty(*columns.shape, self.dims[0])
        values = self.residual_values.new_empty(*columns.shape, self.dims[1])
        for part in self.parts:
            keys[part.rows], values[part.rows] = part.states(columns[part.rows], self.dtype)
        keys = with_residual(keys, self.residual_keys, columns, self.residual_start)
        values = with_residual(values, self.residual_values, columns, self.residual_start)
        return keys, values

    def decode_attention(
        self, query: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, column: int,
        sliding_window: int | None, scaling: float, with_mass: bool, softcap: float | None, explicit: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        """A one-token decode step's attention over the codes themselves
        (:func:`~squeezekv.ops.quantized_decode_attention`, once per precision): the output and,
        if ``with_mass``, each slot's mass ``[batch, heads, slots]``."""
        arguments = (column, sliding_window, scaling, with_mass, None, softcap, explicit)
        columns = self.per_head(positions)
        if len(self.parts) == 1:  # every row at one precision: no row is gathered
            return quantized_decode_attention(
                query, self.parts[0].codes(columns), self.residual_keys, self.residual_values,
                self.residual_start, positions, valid, *arguments,
            )  # fmt: skip
        output = torch.empty_like(query)
        mass = query.new_empty(*columns.shape, dtype=torch.float32) if with_mass else None
        for part in self.parts:
            rows = part.rows
            output[rows], part_mass = quantized_decode_attention(
                query[rows], part.codes(columns[rows]), self.residual_keys[rows], self.residual_values[rows],
                self.residual_start, positions[rows], valid[rows], *arguments,
            )  # fmt: skip
            if with_mass:
                mass[rows] = part_mass
        return output, mass

    def keep(self, chosen: torch.Tensor) -> None:
        """Keeps the ``chosen`` slots. Groups left without tokens go at the next :meth:`settle`
        (no host sync per eviction); until then their scales stay, counted in :meth:`nbytes`."""
        chosen = self.per_head(chosen)
        for part in self.parts:
            part.keep(chosen[part.rows])

    def settle(self, positions: torch.Tensor, valid: torch.Tensor, seen: int) -> None:
        """Quantizes the residual window's kept tokens once ``group_tokens`` columns have arrived."""
        if seen - self.residual_start < self.group_tokens:
            return
        columns, held = self.per_head(positions), self.per_head(valid)
        keys = residual_laid_out(self.residual_keys, columns, self.residual_start)
        values = residual_laid_out(self.residual_values, columns, self.residual_start)
        self.quantize(keys, values, columns, held & (columns >= self.residual_start), held)
        self.residual_start = seen
        self.residual_keys, self.residual_values = empty_window(keys), empty_window(values)

    def nbytes(self) -> int:
        """Bytes of codes, scales, zeros, groups' first columns and the residual window."""
        return sum(part.nbytes() for part in self.parts) + nbytes(self.residual_keys, self.residual_values)

    def full_bytes(self, batch: int, seen: int) -> int:
        return unquantized_bytes(batch, self.heads, seen, self.dims, self.dtype)


def table_groups(prefilled_groups: int, new_columns: int, group_tokens: int) -> int:
    """Entries of a :class:`StaticPackedStates` key-group table: the prefilled groups, then one per
    residual window ``new_columns`` columns can flush (and one for a window already part full)."""
    return prefilled_groups + -(-new_columns // group_tokens) + 1


def group_index_dtype(groups: int) -> torch.dtype:
    """The smallest integer type that numbers ``groups`` key groups (each slot stores its group)."""
    return torch.int16 if groups <= torch.iinfo(torch.int16).max else torch.int32


def packed_bytes_per_head(
    bits: int, dims: tuple[int, int], slots: int, prefilled_tokens: int, new_columns: int, element: int,
    group_tokens: int,
) -> int:  # fmt: skip
    """Bytes one (sequence, head) takes in a :class:`StaticPackedStates` of ``slots`` slots whose
    ``prefilled_tokens`` were quantized at once (their groups of ``group_tokens``), for a decode of
    ``new_columns`` columns, with model states of ``element`` bytes."""
    scale = SCALE_DTYPE.itemsize
    groups = table_groups(-(-prefilled_tokens // group_tokens), new_columns, group_tokens)
    group_index = group_index_dtype(groups).itemsize
    slot = sum(dims) * bits // 8 + 2 * scale * (dims[1] // value_group(dims[1])) + group_index
    return slots * slot + groups * 2 * scale * dims[0] + group_tokens * sum(dims) * element


class StaticPackedStates:
    """The packed keys and values of a fast-engine layer (:class:`~squeezekv.cache.StaticLayer`):
    :class:`PackedStates`' layout, one precision for every row, in buffers whose shapes never
    change, so that a decode step can be captured as a CUDA graph.

    - codes, value scales and zeros per slot (``[batch, heads, slots, ...]``), and each slot's key
      group beside it (``key_group``) instead of searched by column;
    - a table of key scales and zeros: the prefilled rows' groups (right-aligned, as
      :class:`PackedRows` keeps them), then one entry for each residual window the decode will
      quantize, sized at build from its new columns and never compacted;
    - the residual window, ``group_tokens`` columns, column ``c`` at row ``c - residual_start``.

    A decode step writes the new token into the window (:meth:`write`) and attends over codes and
    window (:meth:`decode_attention`), reading the window's start from the device. Between steps,
    on the host and outside any graph, :meth:`settle` quantizes a full window as the simple path
    does, so both paths decode the same numbers.
    """

    def __init__(
        self, parts: list[PackedStates], positions: list[torch.Tensor], slots: int, new_columns: int
    ) -> None:
        """Stacks the packed layers of several micro-batches (their rows, in order; ``positions``:
        each one's slot columns) into buffers of ``slots`` slots."""
        if any(len(part.parts) != 1 for part in parts) or len({part.parts[0].bits for part in parts}) > 1:
            raise ValueError("the fast engine stores every sequence of a layer at one precision")
        if len({(part.residual_start, part.group_tokens) for part in parts}) > 1:
            raise ValueError(
                "micro-batches of one decode batch must have seen the same columns in one key group size"
            )
        first = parts[0]
        self.group_tokens = first.group_tokens
        self.bits, self.dtype = first.parts[0].bits, first.dtype
        self.heads, self.dims = first.heads, first.dims
        self.start = first.residual_start  # on the host; the device's copy is residual_start
        device = first.residual_keys.device
        batch = sum(part.parts[0].rows.numel() for part in parts)
        prefilled = max(part.parts[0].group_start.shape[-1] for part in parts)
        self.next_group = prefilled
        groups = table_groups(prefilled, new_columns, self.group_tokens)
        self.key_codes, self.value_codes = (
            torch.zeros(batch, self.heads, slots, dim * self.bits // 8, dtype=torch.uint8, device=device)
            for dim in self.dims
        )
        value_groups = self.dims[1] // value_group(self.dims[1])
        scale = dict(dtype=SCALE_DTYPE, device=device)
        self.value_scale = torch.zeros(batch, self.heads, slots, value_groups, **scale)
        self.value_zero = torch.zeros_like(self.value_scale)
        self.key_scale = torch.zeros(batch, self.heads, groups, self.dims[0], **scale)
        self.key_zero = torch.zeros_like(self.key_scale)
        group_dtype = group_index_dtype(groups)
        self.key_group = torch.zeros(batch, self.heads, slots, dtype=group_dtype, device=device)
        window = (batch, self.heads, self.group_tokens)
        self.residual_keys = first.residual_keys.new_zeros(*window, self.dims[0])
        self.residual_values = first.residual_values.new_zeros(*window, self.dims[1])
        self.residual_start = torch.tensor([self.start], device=device)
        row = 0
        for part, columns in zip(parts, positions, strict=True):
            packed = part.parts[0]
            rows = slice(row, row + packed.rows.numel())
            held, width = packed.key_codes.shape[2], packed.group_start.shape[-1]
            waiting = part.residual_keys.shape[2]
            for buffer, stored in (
                (self.key_codes, packed.key_codes),
                (self.value_codes, packed.value_codes),
                (self.value_scale, packed.value_scale),
                (self.value_zero, packed.value_zero),
            ):
                buffer[rows, :, :held] = stored
            self.key_scale[rows, :, prefilled - width : prefilled] = packed.key_scale
            self.key_zero[rows, :, prefilled - width : prefilled] = packed.key_zero
            if width:
                group = packed.group_of(part.per_head(columns)) + prefilled - width
                self.key_group[rows, :, :held] = group.to(group_dtype)
            self.residual_keys[rows, :, :waiting] = part.residual_keys
            self.residual_values[rows, :, :waiting] = part.residual_values
            row = rows.stop

    def codes(self) -> PackedCodes:
        return PackedCodes(
            self.bits, self.key_codes, self.key_scale, self.key_zero, self.key_group, self.value_codes,
            self.value_scale, self.value_zero,
        )  # fmt: skip

    def write(self, key: torch.Tensor, value: torch.Tensor, column: torch.Tensor) -> None:
        """The new token (``[batch, heads, 1, dim]``) into the residual window, in place."""
        row = column - self.residual_start
        self.residual_keys.index_copy_(2, row, key)
        self.residual_values.index_copy_(2, row, value)

    def decode_attention(
        self, query: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, column: torch.Tensor,
        sliding_window: int | None, scaling: float, with_mass: bool, add_mass_to: torch.Tensor | None,
        softcap: float | None, explicit: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        """:func:`~squeezekv.ops.quantized_decode_attention` over the codes and the window."""
        return quantized_decode_attention(
            query, self.codes(), self.residual_keys, self.residual_values, self.residual_start, positions,
            valid, column, sliding_window, scaling, with_mass, add_mass_to, softcap, explicit,
        )  # fmt: skip

    def settle(self, positions: torch.Tensor, valid: torch.Tensor, seen: int) -> None:
        """Quantizes the window's kept tokens as the next key group once ``group_tokens`` columns
        have arrived (``seen``: the columns so far), in place."""
        if seen - self.start < self.group_tokens:
            return
        if self.next_group == self.key_scale.shape[2]:
            raise RuntimeError(
                f"the layer was built for {self.key_scale.shape[2]} key groups; decode ran past the "
                "new columns it was sized for"
            )
        columns = positions.expand(-1, self.heads, -1)
        chosen = valid.expand(-1, self.heads, -1) & (columns >= self.start)
        # the window's kept tokens, found once (a host sync); the work is the window's, not the layer's
        row, head, slot = chosen.nonzero(as_tuple=True)
        column = columns[row, head, slot] - self.start
        held = torch.zeros_like(self.residual_keys[..., 0], dtype=torch.bool)
        held[row, head, column] = True
        codes, scale, zero = quantize_key_groups(self.residual_keys, torch.where(held, 0, -1), 1, self.bits)
        self.key_codes[row, head, slot] = codes[row, head, column]
        self.key_scale[:, :, self.next_group] = scale[:, :, 0]
        self.key_zero[:, :, self.next_group] = zero[:, :, 0]
        self.key_group[row, head, slot] = self.next_group
        codes, scale, zero = quantize_values(self.residual_values, self.bits)
        self.value_codes[row, head, slot] = codes[row, head, column]
        self.value_scale[row, head, slot] = scale[row, head, column]
        self.value_zero[row, head, slot] = zero[row, head, column]
        self.next_group += 1
        self.start = seen
        self.residual_start.fill_(seen)

    def nbytes(self) -> int:
        """Bytes of every buffer: codes, scales, zeros, key groups, the group table and the window."""
        return nbytes(*self.slot_buffers(), *self.row_buffers())

    def row_overhead_bytes(self) -> int:
        """Bytes one sequence takes whatever its slots: its group table and residual window."""
        return nbytes(*self.row_buffers()) // self.key_codes.shape[0]

    def slot_buffers(self) -> tuple[torch.Tensor, ...]:
        return self.key_codes, self.value_codes, self.value_scale, self.value_zero, self.key_group

    def row_buffers(self) -> tuple[torch.Tensor, ...]:
        return self.key_scale, self.key_zero, self.residual_keys, self.residual_values

    def full_bytes(self, batch: int, seen: int) -> int:
        return unquantized_bytes(batch, self.heads, seen, self.dims, self.dtype)
