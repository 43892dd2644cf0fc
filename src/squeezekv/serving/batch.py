"""The decode step's cache: the running requests' layers in the block pool, one token per row.

It keeps exactly the tokens the fast engine's :class:`~squeezekv.cache.StaticCache` keeps (write
the new token into the free slot, attend, fold the attention mass into the scores, drop the
lowest-ranked token of a row over its budget), but every row has its own column, budgets and block
table, so requests at different points of their answers decode together. The keys and values stay
in the pool: the new token is written into its block and attention reads each row's blocks through
its block table (:mod:`squeezekv.ops.paged`). The bookkeeping the policy ranks (positions,
validity, scores) is one dense buffer per layer while the batch's membership holds, so the policy
and the eviction run on it as on the fast engine's buffers.

The batch is padded to static shapes (rows and each layer's table width rounded up to powers of
two) in buffers that persist across batches (:class:`Arena`), so a decode step allocates nothing of
its own and is captured as one CUDA graph per shape on the GPU (:class:`DecodeSteps`).
"""

from __future__ import annotations

import math
from collections import Counter

import torch
from torch import nn
from transformers.cache_utils import CacheLayerMixin

from squeezekv.cache.base import CompressedCache
from squeezekv.cache.static import BufferView
from squeezekv.config import SqueezeConfig
from squeezekv.engine import WARM_STEPS
from squeezekv.ops import evict_lowest, paged_decode_attention, write_paged_slot
from squeezekv.policies import KEEP
from squeezekv.serving.store import PAD_BLOCK, BlockPool, LayerSlots


def bucket(count: int) -> int:
    """The static size that ``count`` rows or blocks are padded to: the next power of two, so that a
    few shapes (each a CUDA graph) serve every batch."""
    return 1 << (count - 1).bit_length()


class Arena:
    """Flat storage per named buffer, of which each bucket's buffers are views from the start: buckets
    reuse one allocation and keep their addresses (which a captured step replays) until a larger
    bucket makes a buffer grow, which counts a new ``generation``."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.generation = device, 0
        self.storage: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        need = math.prod(shape)
        storage = self.storage.get(name)
        if storage is None or storage.numel() < need:
            size = need if storage is None else max(need, 2 * storage.numel())
            storage = self.storage[name] = torch.empty(size, dtype=dtype, device=self.device)
            self.generation += 1
        return storage[:need].view(shape)

    def take_layered(
        self, name: str, shapes: list[tuple[int, ...]], dtype: torch.dtype
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One buffer per layer, each of its own shape, as consecutive views of one flat buffer (also
        returned, so that one copy can fill them all)."""
        flat = self.take(name, (sum(math.prod(shape) for shape in shapes),), dtype)
        parts = flat.split([math.prod(shape) for shape in shapes])
        return flat, [part.view(shape) for part, shape in zip(parts, shapes, strict=True)]


class PagedLayer(CacheLayerMixin):
    """One layer of the batch (views of the batch's buffers): block tables (``[batch, width]``, the
    layer's own width), budgets, free slots and bookkeeping (``positions``, ``valid``, ``scores``:
    ``[batch, kv_heads, width * block_size]``)."""

    is_sliding = False

    def __init__(self, *buffers: torch.Tensor) -> None:
        super().__init__()
        self.tables, self.budget, self.free, self.positions, self.valid, self.scores = buffers
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("a PagedLayer is built from stored requests")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        raise RuntimeError("PagedLayer is updated through PagedCache.update")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return int(self.tables.shape[1]), 0  # unused: squeezekv's attention masks from positions

    def get_seq_length(self) -> int:
        raise RuntimeError("a PagedCache needs explicit position_ids")

    def get_max_length(self) -> int:
        return -1


class PagedCache(CompressedCache):
    """The running rows' decode cache over ``pool``; ``layers[l]`` was built from ``slots[row][l]``.

    ``columns`` is each row's column of the token this step feeds, ``prompt_columns`` each row's
    prompt length and ``tokens`` the token each row feeds next. The rows are padded to a bucket
    (:func:`bucket`) and every tensor a step reads is a view of ``arena``, so a step has static
    shapes; ``key`` names the shapes (and what else a captured step depends on). Build a new one
    whenever the batch's membership changes (after :meth:`store_back`).
    """

    def __init__(
        self,
        pool: BlockPool,
        arena: Arena,
        slots: list[list[LayerSlots]],
        config: SqueezeConfig,
        columns: list[int],
        prompt_columns: list[int],
        tokens: list[int],
        scored: bool,
        explicit: bool,
    ) -> None:
        self.rows, batch = len(slots), bucket(len(slots))
        count, heads, block_size = len(slots[0]), pool.kv_heads, pool.block_size
        # each layer is as wide as its own widest row, so that a layer keeping few tokens is not
        # walked as far as the batch's widest layer (squeeze gives a few layers most of the prompt)
        widths = [bucket(max(len(row[index].blocks) for row in slots)) for index in range(count)]
        pad = [0] * (batch - self.rows)
        flat_tables, tables = arena.take_layered("tables", [(batch, width) for width in widths], torch.long)
        flat_tables.copy_(torch.tensor([
            block
            for index, width in enumerate(widths)
            for row in [*(r[index].blocks for r in slots), *([[]] * len(pad))]
            for block in row + [PAD_BLOCK] * (width - len(row))
        ]))  # fmt: skip
        budget = arena.take("budget", (count, batch), torch.long)
        budget.copy_(torch.tensor([[row[index].budget for row in slots] + pad for index in range(count)]))
        free = arena.take("free", (count, batch, heads), torch.long)
        free.zero_()
        free[:, : self.rows] = torch.stack(
            [torch.stack([row[index].free for row in slots]) for index in range(count)]
        )
        shapes = [(batch, heads, width * block_size) for width in widths]
        _, positions = arena.take_layered("positions", shapes, pool.positions.dtype)
        _, valid = arena.take_layered("valid", shapes, pool.valid.dtype)
        _, scores = arena.take_layered("scores", shapes, pool.scores.dtype)
        for layer in zip(tables, positions, valid, scores, strict=True):
            pool.read_bookkeeping(*layer)
        self.layer_buffers = list(zip(tables, budget, free, positions, valid, scores, strict=True))
        super().__init__(layers=[PagedLayer(*buffers) for buffers in self.layer_buffers])
        self.pool, self.config, self.slots = pool, config, slots
        self.scored, self.explicit = scored, explicit
        self.key = (batch, tuple(widths), scored)
        self.columns = arena.take("columns", (batch,), torch.long)
        self.columns.copy_(torch.tensor(columns + pad))
        self.prompt_columns = arena.take("prompt_columns", (batch, 1, 1), torch.long)
        self.prompt_columns.copy_(torch.tensor(prompt_columns + pad).view(-1, 1, 1))
        self.first_column = arena.take("first_column", (batch,), torch.long).zero_()
        self.tokens = arena.take("tokens", (batch, 1), torch.long)
        self.tokens.copy_(torch.tensor(tokens + pad).view(-1, 1))
        self.budgets = torch.tensor([[layer.budget for layer in row] for row in slots])
        self.prompt_tokens = torch.tensor(prompt_columns)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx]
        write_paged_slot(
            key_states, value_states, self.pool.keys, self.pool.values, layer.tables,
            layer.positions, layer.valid, layer.scores, layer.free, self.columns,
        )  # fmt: skip
        return key_states, value_states

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
        layer, policy = self.layers[layer_idx], self.config.policy
        additive = self.scored and policy.adds_mass  # the mass is added to the scores as it is computed
        output, mass = paged_decode_attention(
            query, self.pool.keys, self.pool.values, layer.tables, layer.positions, layer.valid,
            self.columns, sliding_window, scaling, with_mass=self.scored,
            add_mass_to=layer.scores if additive else None, softcap=softcap, explicit=self.explicit,
        )  # fmt: skip
        if mass is not None:
            layer.scores.copy_(policy.fold(layer.scores, mass, "decode"))
        column = self.columns.view(-1, 1, 1)
        if sliding_window is not None:
            layer.valid &= layer.positions > column - sliding_window + 1
        view = BufferView(
            layer.positions,
            layer.valid,
            layer.scores,
            "decode",
            self.prompt_columns,
            self.first_column,
            column,
        )
        priority = policy.priority(view, layer.budget).expand_as(layer.valid)
        newest = policy.newest_kept(layer.budget)
        if newest is not None:  # applied here, so that the eviction kernel needs no per-row column
            priority = torch.where(layer.positions > column - newest.view(-1, 1, 1), KEEP, priority)
        evict_lowest(priority.contiguous(), layer.valid, layer.positions, layer.budget, layer.free)
        return output

    def step(self, model: nn.Module) -> None:
        """One decode step of every row: feeds ``tokens``, leaves each row's next token there and
        moves the columns on. In place on static buffers, so that it can be captured."""
        logits = model(
            input_ids=self.tokens, position_ids=self.columns.view(-1, 1), cache=self, logits_to_keep=1
        ).logits
        self.tokens.copy_(logits[:, -1:].argmax(-1))
        self.columns += 1

    def next_tokens(self) -> list[int]:
        """The real rows' tokens from the last step (a host sync)."""
        return self.tokens[: self.rows, 0].tolist()

    def store_back(self) -> None:
        """Hands each row's bookkeeping back to the pool and its free slots to its
        :class:`LayerSlots`, before the batch is rebuilt."""
        for index, buffers in enumerate(self.layer_buffers):
            tables, _, free, positions, valid, scores = (buffer[: self.rows] for buffer in buffers)
            self.pool.store_bookkeeping(tables, positions, valid, scores)
            for row, row_free in zip(self.slots, free.clone(), strict=True):
                row[index].free = row_free

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.columns[: self.rows].max())

    def kv_bytes_kept(self) -> int:
        blocks = sum(len(layer.blocks) for row in self.slots for layer in row)
        return blocks * self.pool.bytes_per_block

    def kv_bytes_full(self) -> int:
        per_slot = self.pool.bytes_per_block // self.pool.block_size
        return int(self.columns[: self.rows].sum()) * len(self.layers) * per_slot

    def held_tokens(self) -> torch.Tensor:
        held = [layer.valid[: self.rows].sum(-1).amax(-1).cpu() for layer in self.layers]
        return torch.stack(held, dim=1)


class DecodeSteps:
    """Runs a batch's decode step: eagerly off the GPU (or with ``cuda_graphs`` off); on the GPU, one
    CUDA graph per bucket (:attr:`PagedCache.key`), captured after ``WARM_STEPS`` eager steps of that
    bucket (real steps, on a side stream) and replayed for as long as ``arena`` keeps its addresses.
    The graphs share one memory pool: they never run at once and leave nothing in it that outlives
    a replay (the next tokens are in the arena)."""

    def __init__(self, model: nn.Module, arena: Arena, cuda_graphs: bool = True) -> None:
        self.model, self.arena, self.cuda_graphs = model, arena, cuda_graphs
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self.warm_steps: Counter[tuple] = Counter()
        self.generation = arena.generation
        self.graph_memory = None  # the graphs' shared pool, made at the first capture
        self.captured = 0  # graphs captured so far (a moved buffer drops the ones held, not this count)

    def run(self, batch: PagedCache) -> None:
        if not (self.cuda_graphs and batch.tokens.device.type == "cuda"):
            batch.step(self.model)
            return
        if self.arena.generation != self.generation:  # a buffer moved: the graphs would read freed memory
            self.graphs.clear()
            self.warm_steps.clear()
            self.generation = self.arena.generation
            self.graph_memory = None  # freed with its last graph: capturing into it again is an error
        graph = self.graphs.get(batch.key)
        if graph is None and self.warm_steps[batch.key] < WARM_STEPS:
            self.warm_steps[batch.key] += 1
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                batch.step(self.model)
            torch.cuda.current_stream().wait_stream(stream)
            return
        if graph is None:
            if self.graph_memory is None:
                self.graph_memory = torch.cuda.graph_pool_handle()
            graph = self.graphs[batch.key] = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.graph_memory):
                batch.step(self.model)  # recorded, not run: the replay below runs it
            self.captured += 1
        graph.replay()
