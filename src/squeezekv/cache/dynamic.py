"""A KV cache whose layers physically shrink to their budgets.

Each layer holds, besides keys and values, the column of every cached token (its index in the
padded input, which fixes causality and sliding windows after eviction), whether the slot holds a
real token (left padding and ragged batches leave empty slots), and the policy's running score.
``get_seq_length`` reports the logical number of columns seen, never a physical length, so
positions stay true after eviction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import CacheLayerMixin

from squeezekv.cache.base import CompressedCache
from squeezekv.cache.quantized import PackedStates
from squeezekv.cache.ragged import RaggedLayer
from squeezekv.config import SqueezeConfig
from squeezekv.ops import gather_slots, prefill_attention
from squeezekv.policies import LayerView, Policy, select

JOINT_PRIORITIES = 1 << 22  # most priorities (rows x heads x slots) ranked as one batch at an eviction


@dataclass(frozen=True)
class Selection:
    """What a layer keeps at an eviction: the slots ``chosen`` (``[batch, heads, kept]``, in slot
    order) and their positions, scores and validity (a surplus slot of a shorter row is invalid)."""

    chosen: torch.Tensor
    positions: torch.Tensor
    scores: torch.Tensor
    valid: torch.Tensor

    @classmethod
    def of(cls, view: LayerView, chosen: torch.Tensor, kept: torch.Tensor) -> Selection:
        """The ``chosen`` slots of ``view``, of which ``kept`` hold a kept token."""
        heads = chosen.shape[1]

        def at(slots: torch.Tensor) -> torch.Tensor:
            return slots.expand(-1, heads, -1).gather(-1, chosen)

        return cls(chosen, at(view.positions), at(view.scores), kept & at(view.valid))

    def parts(self) -> tuple[torch.Tensor, ...]:
        return self.chosen, self.positions, self.scores, self.valid

    def split(self, rows: int) -> list[Selection]:
        """Selections made for several layers stacked as rows, ``rows`` a layer."""
        return [Selection(*layer) for layer in zip(*(part.split(rows) for part in self.parts()), strict=True)]

    def to(self, device: torch.device) -> Selection:
        if self.chosen.device == device:
            return self
        return Selection(*(part.to(device) for part in self.parts()))


class SqueezeLayer(CacheLayerMixin):
    """One layer's compressed cache: tensors are ``[batch, heads, slots, ...]``.

    ``positions``, ``valid`` and ``scores`` have one head while all heads keep the same tokens.
    ``appended_only``: nothing was ever evicted, so the layer holds every column seen so far.
    ``head_budgets``: set when the policy spread the budget over the heads at an eviction; the
    cache then replaces this layer by a packed :class:`~squeezekv.cache.ragged.RaggedLayer`.
    ``packed``: set once the layer's keys and values are quantized (``kv_bits`` < 16); it then holds
    them instead of ``keys`` and ``values``.
    """

    is_sliding = False

    def __init__(self, sliding_window: int | None = None) -> None:
        super().__init__()
        self.sliding_window = sliding_window
        self.positions = self.valid = self.scores = None
        self.seen = 0
        self.appended_only = True
        self.head_budgets: torch.Tensor | None = None
        self.packed: PackedStates | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, device = key_states.shape[0], key_states.device
        self.keys = key_states[:, :, :0]
        self.values = value_states[:, :, :0]
        self.positions = torch.zeros(batch, 1, 0, dtype=torch.int64, device=device)
        self.valid = torch.zeros(batch, 1, 0, dtype=torch.bool, device=device)
        self.scores = torch.zeros(batch, 1, 0, dtype=torch.float32, device=device)
        self.is_initialized = True

    def append(
        self, key_states: torch.Tensor, value_states: torch.Tensor, new_valid: torch.Tensor,
        reads_codes: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Appends ``q`` new tokens whose validity is ``new_valid`` (``[batch, q]``); returns every
        slot's keys and values or, when attention ``reads_codes`` (:meth:`SqueezeCache.reads_codes`),
        only the new tokens' (no transient copy of a quantized layer)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        batch, heads, q = key_states.shape[:3]
        columns = torch.arange(self.seen, self.seen + q, device=key_states.device)
        track_heads = self.positions.shape[1]
        self.store(key_states, value_states)
        self.positions = torch.cat([self.positions, columns.expand(batch, track_heads, q)], dim=-1)
        self.valid = torch.cat(
            [self.valid, new_valid.to(self.valid.device)[:, None].expand(-1, track_heads, -1)], -1
        )
        self.scores = torch.cat([self.scores, self.scores.new_zeros(batch, self.scores.shape[1], q)], dim=-1)
        self.seen += q
        return (key_states, value_states) if reads_codes else self.states()

    def store(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Keeps the new tokens' keys and values in new last slots."""
        if self.packed is not None:
            self.packed.store(key_states, value_states)
        elif self.keys.shape[-2]:
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
        else:  # the first chunk: a concatenation would only copy it
            self.keys, self.values = key_states, value_states

    def states(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every slot's keys and values, as attention reads them."""
        if self.packed is not None:
            return self.packed.states(self.positions)
        return self.keys, self.values

    def keep(self, selection: Selection, states: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Keeps the ``selection``'s slots: their bookkeeping, and their keys and values, given as
        ``states`` when gathered with other layers' (:func:`~squeezekv.ops.gather_slots`)."""
        self.positions, self.scores, self.valid = selection.positions, selection.scores, selection.valid
        self.appended_only = False
        if self.packed is not None:
            self.packed.keep(selection.chosen)
            return
        if states is None:
            states = gather_slots([self.keys, self.values], [selection.chosen] * 2)
        self.keys, self.values = states

    def settle(self, bits: torch.Tensor, group_tokens: int) -> None:
        """After an eviction round, with each row's ``bits`` (``[batch]``): quantizes the layer's
        tokens (in key groups of ``group_tokens``) the first time some row is below 16 bits, later
        the residual window once it is full."""
        if self.packed is not None:
            self.packed.settle(self.positions, self.valid, self.seen)
        elif self.is_initialized and not bool((bits == 16).all()):
            self.packed = PackedStates(
                self.keys, self.values, self.positions, self.valid, self.seen, bits, group_tokens
            )
            self.keys = self.values = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        raise RuntimeError("SqueezeLayer is updated through SqueezeCache.update")

    def add_mass(self, mass: torch.Tensor, phase: str, policy: Policy) -> None:
        """Folds this forward's attention mass per key (``[batch, kv_heads, slots]``) into the scores."""
        scores = (
            self.scores.expand(-1, mass.shape[1], -1)
            if self.scores.shape[1] != mass.shape[1]
            else self.scores
        )
        self.scores = policy.fold(scores, mass.float(), phase)

    def visible(self) -> torch.Tensor:
        """Valid slots that a future query can still see (sliding windows drop the rest for good)."""
        if self.sliding_window is None:
            return self.valid
        return self.valid & (self.positions > self.seen - self.sliding_window)

    @staticmethod
    def eviction_need(visible: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
        """``[layers, 2]`` for layers stacked as ``visible`` (``[layers, batch, heads, slots]``) and
        ``budget`` (``[layers, batch]``): whether anything must go (a row over its budget, or a slot
        to drop) and the widest row that stays, so that the planning of every layer costs one host
        sync in all."""
        held = visible.sum(-1)
        budget = budget.to(held.device).unsqueeze(-1)
        fits = (held <= budget).flatten(1).all(-1) & visible.flatten(1).all(-1)
        return torch.stack([(~fits).long(), torch.minimum(budget, held).flatten(1).amax(-1)], -1)

    def evict(self, budget: torch.Tensor, width: int, view: LayerView, policy: Policy) -> None:
        """Shrinks every sequence of this layer to at most its budget (``[batch]`` tokens), in
        ``width`` slots, ranking its own tokens; ``view.valid`` and ``width`` come from
        :meth:`visible` and :meth:`eviction_need`."""
        self.head_budgets = policy.head_budgets(view, budget)
        if self.head_budgets is not None:
            width = int(torch.minimum(self.head_budgets, view.valid.sum(-1)).max())
        chosen, kept = ranked_selection(view, budget, width, policy, self.scores.shape[1], self.head_budgets)
        self.keep(Selection.of(view, chosen, kept))

    def truncate(self, columns: int) -> None:
        """Drops every column from ``columns`` on (a pass whose keys must not stay); only a layer
        that never evicted holds them as its last slots."""
        if not self.appended_only or self.packed is not None:
            raise RuntimeError("truncate needs a layer that never evicted nor quantized")
        self.keys, self.values = self.keys[:, :, :columns], self.values[:, :, :columns]
        self.positions, self.valid = self.positions[..., :columns], self.valid[..., :columns]
        self.scores = self.scores[..., :columns]
        self.seen = columns

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def reset(self) -> None:
        """Drops every tensor, so the memory is freed."""
        self.keys = self.values = self.positions = self.valid = self.scores = self.head_budgets = None
        self.packed = None
        self.seen, self.is_initialized, self.appended_only = 0, False, True

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def held_tokens(self) -> torch.Tensor:
        """Tokens each sequence really holds: ``[batch]`` (the largest over heads)."""
        return self.valid.sum(-1).amax(-1)

    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        if self.packed is not None:
            return self.packed.nbytes()
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    def full_bytes(self) -> int:
        """Bytes a plain cache would hold for every column this layer has seen."""
        if not self.is_initialized:
            return 0
        if self.packed is not None:
            return self.packed.full_bytes(self.valid.shape[0], self.seen)
        batch, heads, _, dim = self.keys.shape
        return 2 * batch * heads * self.seen * dim * self.keys.element_size()


def score_dispersion(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[batch]``: how widely a layer's scores spread over its valid tokens, the mean over heads of
    ``exp(entropy) / tokens`` of each head's scores as a distribution (in (0, 1]; 1 for even scores,
    ``1 / tokens`` for one token's); a head whose scores hold nothing counts 0."""
    scores, valid = torch.broadcast_tensors(scores.double(), valid)
    scores = torch.where(valid, scores, 0.0)
    total = scores.sum(-1, keepdim=True)
    share = scores / total.clamp(min=torch.finfo(torch.float64).tiny)
    entropy = -torch.special.xlogy(share, share).sum(-1)
    spread = entropy.exp() / valid.sum(-1).clamp(min=1)
    return torch.where(total.squeeze(-1) > 0, spread, 0.0).mean(-1)


def ranked_selection(
    view: LayerView,
    budget: torch.Tensor,
    width: int,
    policy: Policy,
    score_heads: int,
    head_budgets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~squeezekv.policies.select` over the policy's ranking for ``budget`` (``[batch]``),
    keeping ``head_budgets`` per head where given, on as many heads as the ranking or the scores
    (``score_heads``) have."""
    priority = policy.ranking(view, budget)
    heads = max(priority.shape[1], score_heads)
    keep = budget if head_budgets is None else head_budgets
    return select(priority.expand(-1, heads, -1), view.valid.expand(-1, heads, -1), keep, width)


class SqueezeCache(CompressedCache):
    """The cache squeezekv installs: one :class:`SqueezeLayer` per decoder layer.

    The model hook calls :meth:`begin_forward` with the new tokens' validity before each forward;
    budgets (``[batch, layers]``) are set once the prefill has measured every layer.
    """

    def __init__(
        self, config: SqueezeConfig, sliding_windows: list[int | None], explicit: bool = False
    ) -> None:
        super().__init__(layers=[SqueezeLayer(window) for window in sliding_windows])
        self.config = config
        self.explicit = explicit
        self.budgets: torch.Tensor | None = None
        self.layer_bits: torch.Tensor | None = None  # [batch, layers], set with budgets when quantizing
        self.head_dims: tuple[int, int] | None = None  # keys' and values', once a layer is updated
        self.prompt_columns = 0
        self.prompt_tokens: torch.Tensor | None = None
        self.first_column: torch.Tensor | None = None
        self.new_valid: torch.Tensor | None = None
        self.question_start: torch.Tensor | None = None
        self.forwards = 0
        self.prefill_forwards = 1
        self.reconstructing = False  # the second pass of a policy that reconstructs the prompt
        self.plainly_causal = False  # a fresh, unpadded prompt: no mask needed

    @property
    def phase(self) -> str:
        if self.reconstructing:
            return "reconstruct"
        return "prefill" if self.forwards <= self.prefill_forwards else "decode"

    def expect_prompt(
        self, valid: torch.Tensor, forwards: int, question_start: torch.Tensor | None = None
    ) -> None:
        """Declares a prompt (``[batch, columns]`` validity) that arrives in ``forwards`` chunks;
        ``question_start`` (``[batch]`` columns) is where each prompt's question begins, if known."""
        self.prompt_columns = valid.shape[1]
        self.prompt_tokens = valid.sum(-1)
        self.first_column = self.prompt_columns - self.prompt_tokens
        self.prefill_forwards = forwards
        self.question_start = question_start

    def truncate(self, columns: int) -> None:
        """Forgets every column from ``columns`` on, in every layer."""
        for layer in self.layers:
            layer.truncate(columns)

    def view(self, layer: SqueezeLayer, visible: torch.Tensor) -> LayerView:
        return LayerView(
            layer.positions,
            visible,
            layer.scores,
            self.phase,
            self.prompt_columns,
            self.first_column,
            self.question_start,
        )

    def scoring_queries(self, query: torch.Tensor) -> tuple[int, torch.Tensor]:
        """How many trailing queries of this forward score keys, and which of them are real (a
        policy that observes the question counts only the question's)."""
        policy, queries = self.config.policy, query.shape[2]
        scored = 0 if self.config.keeps_everything else policy.scored_queries(self.phase, queries)
        valid = self.new_valid.to(query.device)  # under a device_map, layers sit on several devices
        if scored and policy.observes_question and self.phase == "prefill":
            if self.question_start is None:
                raise ValueError(
                    f"policy {policy.spec!r} observes the question, but the prompt did not say where it "
                    "starts: pass question_start (each prompt's first question token)"
                )
            seen = self.layers[0].seen
            columns = torch.arange(seen - queries, seen, device=query.device)
            valid = valid & (columns >= self.question_start.to(query.device).view(-1, 1))
        return scored, valid

    def begin_forward(self, new_valid: torch.Tensor) -> None:
        self.new_valid = new_valid.bool()
        self.forwards += 1
        self.plainly_causal = self.forwards == 1 and bool(self.new_valid.all())
        if self.forwards == 1 and self.prompt_tokens is None:
            self.expect_prompt(self.new_valid, forwards=1)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.new_valid is None:
            raise RuntimeError(
                "SqueezeCache used outside squeezekv.compress(...): the model hook is not installed"
            )
        self.head_dims = (key_states.shape[-1], value_states.shape[-1])
        layer = self.layers[layer_idx]
        if self.reads_codes(layer, key_states.shape[2]):
            return layer.append(key_states, value_states, self.new_valid, reads_codes=True)
        return layer.append(key_states, value_states, self.new_valid)

    def reads_codes(self, layer: SqueezeLayer | RaggedLayer, queries: int) -> bool:
        """Whether attention over ``layer`` reads its packed codes directly
        (:func:`~squeezekv.ops.quantized_decode_attention`): a one-token decode step over a quantized
        layer whose policy sums the mass (the decode ops give no peak)."""
        packed = isinstance(layer, SqueezeLayer) and layer.packed is not None
        return packed and queries == 1 and not self.config.policy.peak_mass(self.phase)

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
        """Attention of this forward's queries over layer ``layer_idx``, scoring keys if the policy asks."""
        layer = self.layers[layer_idx]
        if sliding_window != layer.sliding_window:
            raise RuntimeError(
                f"layer {layer_idx}: sliding window {sliding_window} != {layer.sliding_window}"
            )
        scored, scoring_valid = self.scoring_queries(query)
        if self.reads_codes(layer, query.shape[2]):
            output, mass = layer.packed.decode_attention(
                query, layer.positions, layer.valid, layer.seen - 1, layer.sliding_window, scaling,
                scored > 0, softcap, self.explicit,
            )  # fmt: skip
            if mass is not None:  # a padding query's mass counts for nothing, as in the prefill op
                mass.mul_(scoring_valid.view(-1, 1, 1))
        else:
            output, mass = prefill_attention(
                query,
                key,
                value,
                layer.positions,
                layer.valid,
                layer.seen - query.shape[2],
                layer.sliding_window,
                scaling,
                scored,
                scoring_valid,
                softcap,
                self.explicit,
                self.plainly_causal,
                self.config.policy.peak_mass(self.phase),
            )
        if mass is not None:
            layer.add_mass(mass, self.phase, self.config.policy)
        return output

    def evict(self) -> None:
        """Evicts every layer to its budgets, with one host sync for all layers' plans.

        Layers that never evicted and see every column hold the same tokens, so under a policy
        that ranks by position alone (and scores nothing) those with the same budgets share one
        plan and one :class:`Selection` (at a whole-prompt prefill: one per budget group instead of
        one per layer); other layers are ranked several at a time (:meth:`joint_selections`), and
        the kept keys and values of all of them gathered at once. A keep-everything budget limits a
        layer to every column seen: only what a sliding window no longer sees leaves.
        """
        limits = self.budgets
        if self.config.keeps_everything:
            limits = torch.full_like(limits, self.layers[0].seen)
        visible = [layer.visible() for layer in self.layers]
        home = visible[0].device
        on_home = limits.to(home)  # one copy to the device; budgets are planned on the host
        budgets = [on_home[:, index].to(seen.device) for index, seen in enumerate(visible)]
        policy = self.config.policy
        by_position = policy.ranks_by_position and not policy.scores_tokens
        groups: dict[tuple, list[int]] = {}
        for index, layer in enumerate(self.layers):
            shared = by_position and layer.appended_only and layer.sliding_window is None
            key = ("shared", *limits[:, index].tolist()) if shared else ("own", index)
            groups.setdefault(key, []).append(index)
        plan = self.eviction_plan([members[0] for members in groups.values()], visible, budgets)
        selections = self.joint_selections(groups, plan, visible, budgets)
        plain = [index for index in selections if self.layers[index].packed is None]
        chosen = [selections[index].chosen for index in plain]
        keys = gather_slots([self.layers[index].keys for index in plain], chosen)
        values = gather_slots([self.layers[index].values for index in plain], chosen)
        states = dict(zip(plain, zip(keys, values, strict=True), strict=True))
        for members, (needed, width) in zip(groups.values(), plan, strict=True):
            for index in members if needed else ():
                layer = self.layers[index]
                if index in selections:
                    layer.keep(selections[index], states.get(index))
                    continue
                layer.evict(budgets[index], width, self.view(layer, visible[index]), policy)
                if isinstance(layer, SqueezeLayer) and layer.head_budgets is not None:  # heads differ: packed
                    self.layers[index] = RaggedLayer(layer, layer.head_budgets)
        for index, layer in enumerate(self.layers if self.layer_bits is not None else ()):
            layer.settle(self.layer_bits[:, index], self.config.kv_group)

    def eviction_plan(
        self, leaders: list[int], visible: list[torch.Tensor], budgets: list[torch.Tensor]
    ) -> list[list[int]]:
        """Each leader's ``[needed, width]`` (:meth:`SqueezeLayer.eviction_need`), layers of one kind
        and shape worked out as one stack, all read back in one host sync."""
        alike: dict[tuple, list[int]] = {}
        for index in leaders:
            key = (type(self.layers[index]), visible[index].shape, visible[index].device)
            alike.setdefault(key, []).append(index)
        home, needs = visible[0].device, {}
        for (kind, *_), part in alike.items():
            stacked = torch.stack([visible[index] for index in part])
            need = kind.eviction_need(stacked, torch.stack([budgets[index] for index in part]))
            needs.update(zip(part, need.to(home), strict=True))
        return torch.stack([needs[index] for index in leaders]).tolist()

    def joint_selections(
        self,
        groups: dict[tuple, list[int]],
        plan: list[list[int]],
        visible: list[torch.Tensor],
        budgets: list[torch.Tensor],
    ) -> dict[int, Selection]:
        """The selections of every layer that must evict and whose heads share its budget, each
        group's leader ranked for its members, leaders ranked as the rows of one batch as many at a
        time as ``JOINT_PRIORITIES`` allows (a bounded transient; for one 8k-token sequence, all 32
        layers of Mistral-7B's 8 key-value heads at once, 16 of Llama-2-7B's 32): the ranking, the
        selection and the kept slots' positions, scores and validity launch a few dozen small
        kernels, which the host, not the GPU, paces when every layer launches its own."""
        policy = self.config.policy
        alike: dict[tuple, list[list[int]]] = {}
        for members, (needed, width) in zip(groups.values(), plan, strict=True):
            layer = self.layers[members[0]]
            if needed and isinstance(layer, SqueezeLayer) and not policy.spreads_over_heads:
                shapes = (layer.positions.shape, layer.scores.shape, visible[members[0]].shape)
                alike.setdefault((width, visible[members[0]].device, *shapes), []).append(members)
        selections = {}
        for (width, _, (rows, heads, slots), score_shape, _), parts in alike.items():
            score_heads = score_shape[1]
            together = max(1, JOINT_PRIORITIES // (rows * max(heads, score_heads) * slots))
            for start in range(0, len(parts), together):
                leaders = [members[0] for members in parts[start : start + together]]
                view = LayerView.stacked([self.view(self.layers[index], visible[index]) for index in leaders])
                budget = torch.cat([budgets[index] for index in leaders])
                chosen, kept = ranked_selection(view, budget, width, policy, score_heads)
                for members, selection in zip(
                    parts[start : start + together], Selection.of(view, chosen, kept).split(rows), strict=True
                ):
                    selections.update({index: selection.to(visible[index].device) for index in members})
        return selections

    def score_dispersion(self) -> torch.Tensor:
        """``[batch, layers]`` (float64, on the host): how widely each layer's scores spread over the
        tokens it holds (:func:`score_dispersion`); after a prefill, the whole prompt's."""
        home = self.layers[0].scores.device
        spreads = [score_dispersion(layer.scores, layer.valid).to(home) for layer in self.layers]
        return torch.stack(spreads, dim=1).cpu()

    def kv_bytes_kept(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def kv_bytes_full(self) -> int:
        return sum(layer.full_bytes() for layer in self.layers)

    def held_tokens(self) -> torch.Tensor:
        return torch.stack([layer.held_tokens().cpu() for layer in self.layers], dim=1)
