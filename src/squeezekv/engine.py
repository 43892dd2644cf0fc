"""The fast engine: static-shape decode on preallocated per-layer buffers.

After prefill every layer's budget is fixed, so each layer lives in a buffer of exactly its budget
plus one slot. A decode step writes the new token into the free slot in place, attends over the
buffer, updates the policy's scores and frees the slot of the token it evicts: no concatenation,
no reallocation, the same shapes every step. That makes the step capturable as one CUDA graph; on
the CPU the same code runs eagerly. It keeps exactly the tokens the simple path keeps.

Prefill runs through the simple path (``squeezekv.compress``) in micro-batches, each compressed
before the next starts, so the prompt's full cache exists for one micro-batch at a time and the
decode batch can be as large as the compressed caches allow.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin

from squeezekv import kernels
from squeezekv.architectures import Architecture, architecture_of, decoder_layers
from squeezekv.attention import attend
from squeezekv.cache import SqueezeCache, SqueezeLayer
from squeezekv.config import SqueezeConfig
from squeezekv.distributed import model_devices, synchronized, tensor_parallel_size
from squeezekv.generation import GenerationResult, GenerationStats, check_prompt
from squeezekv.policies import KEEP, POLICIES, LayerView, Policy
from squeezekv.session import compress, routed_attention

WARM_STEPS = 2  # eager decode steps before a CUDA graph is captured


@dataclass(frozen=True)
class BufferView(LayerView):
    """A :class:`LayerView` of a buffer whose slots are not in position order.

    The newest tokens come from positions instead of slot order. That is exact for the question
    policies ask (the newest ``n`` tokens, which they always keep): those tokens are never evicted,
    so they are the contiguous columns ending at ``last_column``.
    """

    last_column: torch.Tensor | None = None

    def newest(self, count: torch.Tensor) -> torch.Tensor:
        return self.positions > self.last_column - count


class StaticLayer(CacheLayerMixin):
    """One layer's buffer: ``[batch, kv_heads, slots, dim]`` keys and values, ``slots`` = budget + 1.

    ``positions``, ``valid`` and ``scores`` are ``[batch, heads, slots]``; ``free`` (``[batch,
    heads]``) is the slot the next token is written to.
    """

    is_sliding = False
    is_compileable = True

    def __init__(self, parts: list[SqueezeLayer], budget: torch.Tensor, config: SqueezeConfig) -> None:
        """Stacks the prefilled layers of several micro-batches (their rows, in order) into one buffer."""
        super().__init__()
        first = parts[0]
        self.sliding_window = first.sliding_window
        self.budget = budget.to(first.keys.device)
        policy = POLICIES[config.policy]
        per_head = policy.scored_queries("decode", 1, config) > 0
        self.newest_kept = policy.newest_kept(self.budget, config)  # fixed with the budget
        batch = sum(part.keys.shape[0] for part in parts)
        kv_heads, dim = first.keys.shape[1], first.keys.shape[-1]
        heads = kv_heads if per_head else max(max(p.positions.shape[1], p.scores.shape[1]) for p in parts)
        slots = int(budget.max()) + 1
        self.keys = first.keys.new_zeros(batch, kv_heads, slots, dim)
        self.values = first.values.new_zeros(batch, kv_heads, slots, first.values.shape[-1])
        self.positions = first.positions.new_zeros(batch, heads, slots)
        self.valid = first.valid.new_zeros(batch, heads, slots)
        self.scores = first.scores.new_zeros(batch, heads, slots)
        row = 0
        for part in parts:
            rows, held = slice(row, row + part.keys.shape[0]), part.keys.shape[2]
            self.keys[rows, :, :held], self.values[rows, :, :held] = part.keys, part.values
            self.positions[rows, :, :held] = part.positions
            self.valid[rows, :, :held] = part.valid
            self.scores[rows, :, :held] = part.scores
            row = rows.stop
        self.free = (~self.valid).to(torch.uint8).argmax(-1)  # the slot the next token goes to
        self.on_triton = self.keys.is_cuda and kernels.triton is not None  # bookkeeping kernels
        self.is_initialized = True

    def write(self, key: torch.Tensor, value: torch.Tensor, column: torch.Tensor) -> None:
        """Puts the new token (``[batch, kv_heads, 1, dim]``) in the free slot, in place."""
        write = kernels.write_slot if self.on_triton else write_slot
        write(key, value, self.keys, self.values, self.positions, self.valid, self.scores, self.free, column)

    def evict(self, view: BufferView, config: SqueezeConfig) -> None:
        """Drops, in rows over budget, the lowest-ranked token (ties: the oldest); frees a slot."""
        if self.sliding_window is not None:
            self.valid &= self.positions > view.last_column - self.sliding_window + 1
        priority = POLICIES[config.policy].priority(view, self.budget, config)
        evict = kernels.evict_lowest if self.on_triton else evict_lowest
        evict(
            priority, self.valid, self.positions, self.budget, self.free, view.last_column, self.newest_kept
        )

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("a StaticLayer is built from a prefilled SqueezeLayer")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        raise RuntimeError("StaticLayer is updated through StaticCache.update")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.shape[2], 0

    def get_seq_length(self) -> int:
        raise RuntimeError("a StaticCache needs explicit position_ids")

    def get_max_length(self) -> int:
        return self.keys.shape[2]


def write_slot(
    key: torch.Tensor,
    value: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor,
    scores: torch.Tensor,
    free: torch.Tensor,
    column: torch.Tensor,
) -> None:
    """The plain path of :func:`squeezekv.kernels.write_slot` (same arguments, same result)."""
    kv_slot = free.expand(-1, key.shape[1]).unsqueeze(-1).unsqueeze(-1)
    keys.scatter_(2, kv_slot.expand(-1, -1, -1, key.shape[-1]), key)
    values.scatter_(2, kv_slot.expand(-1, -1, -1, value.shape[-1]), value)
    slot = free.unsqueeze(-1)
    positions.scatter_(-1, slot, column.expand_as(slot))
    valid.scatter_(-1, slot, True)
    scores.scatter_(-1, slot, 0.0)


def evict_lowest(
    priority: torch.Tensor,
    valid: torch.Tensor,
    positions: torch.Tensor,
    budget: torch.Tensor,
    free: torch.Tensor,
    column: torch.Tensor | None = None,
    newest: torch.Tensor | None = None,
) -> None:
    """The plain path of :func:`squeezekv.kernels.evict_lowest` (same arguments, same result)."""
    if newest is not None:
        priority = torch.where(positions > column - newest.view(-1, 1, 1), KEEP, priority)
    priority = torch.where(valid, priority.float(), torch.inf)  # float32, as the kernel ranks
    lowest = priority == priority.amin(-1, keepdim=True)
    oldest = torch.where(lowest & valid, positions, torch.iinfo(torch.int64).max)
    victim = oldest.argmin(-1, keepdim=True)
    over = valid.sum(-1, keepdim=True) > budget.view(-1, 1, 1)
    valid.scatter_(-1, victim, valid.gather(-1, victim) & ~over)
    free.copy_((~valid).to(torch.uint8).argmax(-1))


class StaticCache(Cache):
    """Per-layer buffers for single-token decode steps with static shapes."""

    def __init__(self, caches: list[SqueezeCache], config: SqueezeConfig) -> None:
        first = caches[0]
        columns_seen = first.layers[0].seen
        layers = []
        for index in range(len(first.layers)):
            parts = [cache.layers[index] for cache in caches]
            budget = torch.cat([cache.budgets[:, index] for cache in caches])
            layers.append(StaticLayer(parts, budget, config))
            for part in parts:  # one layer at a time: the conversion needs one layer's worth of extra memory
                part.reset()
        super().__init__(layers=layers)
        self.config = config
        first_column = torch.cat([c.prompt_columns - c.prompt_tokens for c in caches])
        devices = {layer.keys.device for layer in layers}  # several under a device_map
        self.columns = {device: torch.tensor([columns_seen], device=device) for device in devices}
        self.first_columns = {device: first_column.to(device) for device in devices}
        self.prompt_columns = first.prompt_columns
        self.explicit = first.explicit

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx]
        layer.write(key_states, value_states, self.columns[layer.keys.device])
        return layer.keys, layer.values

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
        layer = self.layers[layer_idx]
        column = self.columns[layer.keys.device]
        policy = POLICIES[self.config.policy]
        scored = policy.scored_queries("decode", 1, self.config)
        if self.fused(query, softcap):
            additive = scored and policy.fold is Policy.fold  # the kernel adds the mass to the scores
            output, mass = kernels.attend_decode(
                query,
                key,
                value,
                layer.positions,
                layer.valid,
                column,
                layer.sliding_window,
                scaling,
                with_mass=scored > 0,
                add_mass_to=layer.scores if additive else None,
            )
        else:
            mask = layer.valid
            if layer.sliding_window is not None:
                mask = mask & (layer.positions > column - layer.sliding_window)
            output, mass = attend(
                query, key, value, mask.unsqueeze(2), scaling, scored, None, softcap, explicit=self.explicit
            )
        if mass is not None:  # in place: a captured step must read this step's scores on replay
            layer.scores.copy_(policy.fold(layer.scores, mass, "decode", self.config))
        view = BufferView(
            layer.positions,
            layer.valid,
            layer.scores,
            phase="decode",
            prompt_columns=self.prompt_columns,
            first_column=self.first_columns[layer.keys.device],
            last_column=column,
        )
        layer.evict(view, self.config)
        return output

    def fused(self, query: torch.Tensor, softcap: float | None) -> bool:
        """Whether the Triton decode kernel serves this query (an eager-attention model keeps the
        plain path, which computes as eager attention does)."""
        return query.is_cuda and not self.explicit and softcap is None and kernels.available(query)

    def advance(self) -> None:
        for column in self.columns.values():
            column += 1

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.columns[self.layers[layer_idx].keys.device])

    def kv_bytes_kept(self) -> int:
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in self.layers)

    def kv_bytes_full(self) -> int:
        """Bytes a plain cache would hold for every column seen, in every layer."""
        columns = self.get_seq_length()
        return sum(2 * layer.keys[:, :, :1].nbytes * columns for layer in self.layers)

    def held_tokens(self) -> torch.Tensor:
        return torch.stack([layer.valid.sum(-1).amax(-1).cpu() for layer in self.layers], dim=1)


@contextmanager
def compiled_parts(
    model: nn.Module, architecture: Architecture, backend: str | Callable = "inductor"
) -> Iterator[None]:
    """Runs the parts ``architecture`` names (``compiled``, ``compiled_functions``) through
    ``torch.compile`` inside the block; modules of one class share a compiled graph. The model's
    own code comes back on exit."""
    layers = decoder_layers(model, architecture)
    modules = [getattr(layer, name) for layer in layers for name in architecture.compiled]
    namespace = sys.modules[type(getattr(layers[0], architecture.attention)).__module__]
    functions = {name: getattr(namespace, name) for name in architecture.compiled_functions}
    for module in modules:
        module.forward = torch.compile(module.forward, backend=backend, fullgraph=True)
    for name, function in functions.items():
        setattr(namespace, name, torch.compile(function, backend=backend, fullgraph=True))
    try:
        yield
    finally:
        for module in modules:
            module.__dict__.pop("forward", None)
        for name, function in functions.items():
            setattr(namespace, name, function)


class FastGenerator:
    """Greedy generation with squeezekv: micro-batched prefill, then static decode steps
    (one CUDA graph per step on the GPU).

    With ``compile_layers``, the captured step runs the layers' norms, dense MLPs and rotary
    embeddings compiled (:func:`compiled_parts`), so that their chains of small kernels become a
    few; not under tensor parallelism, whose communication hooks sit on the projections.
    """

    def __init__(
        self, model: nn.Module, config: SqueezeConfig, cuda_graphs: bool = True, compile_layers: bool = True
    ) -> None:
        self.model, self.config = model, config
        self.architecture = architecture_of(model)
        self.devices = model_devices(model)
        if cuda_graphs and len(self.devices) > 1:
            raise ValueError(
                f"CUDA graphs capture one device, but the model spans {[str(d) for d in self.devices]} "
                "(a device_map); use cuda_graphs=False"
            )
        self.cuda_graphs = cuda_graphs
        self.compile_layers = compile_layers and tensor_parallel_size(model) == 1
        self.cache: StaticCache | None = None
        self.steady_step_seconds: float | None = None  # per step, once warm-up and capture are done

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        prefill_batch: int | None = None,
        prefill_chunk: int | None = None,
    ) -> GenerationResult:
        """Greedy continuation of a (left-padded) batch.

        The prefill runs ``prefill_batch`` sequences at a time and, with ``prefill_chunk``, that
        many columns at a time, compressing after each chunk (see :meth:`Session.prefill`).
        """
        check_prompt(self.model, input_ids, attention_mask, max_new_tokens, self.config)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        started = time.perf_counter()
        caches, similarity, first_tokens = self.prefill(
            input_ids, attention_mask, max_new_tokens, prefill_batch, prefill_chunk
        )
        self.cache = StaticCache(caches, self.config)
        prefill_seconds = synchronized(self.devices) - started
        new_tokens = torch.empty(
            input_ids.shape[0], max_new_tokens, dtype=torch.long, device=input_ids.device
        )
        new_tokens[:, 0] = first_tokens
        positions = attention_mask.sum(-1, keepdim=True)
        started = time.perf_counter()
        with routed_attention(self.model, self.architecture, self):
            step = self.decode_steps(new_tokens[:, :1], positions, max_new_tokens - 1)
            for index in range(1, max_new_tokens):
                if index == WARM_STEPS + 1:
                    steady_started = synchronized(self.devices)
                new_tokens[:, index] = step()
        finished = synchronized(self.devices)
        decode_seconds = finished - started
        if max_new_tokens > WARM_STEPS + 1:
            self.steady_step_seconds = (finished - steady_started) / (max_new_tokens - 1 - WARM_STEPS)
        sequences = torch.cat([input_ids, new_tokens], dim=1)
        stats = GenerationStats(
            layer_similarity=similarity,
            layer_budget=torch.cat([cache.budgets for cache in caches]),
            layer_tokens_held=self.cache.held_tokens(),
            prompt_tokens=attention_mask.sum(-1).tolist(),
            kv_bytes_full=self.cache.kv_bytes_full(),
            kv_bytes_kept=self.cache.kv_bytes_kept(),
            prefill_seconds=prefill_seconds,
            decode_seconds=decode_seconds,
            decode_steps=max_new_tokens - 1,
            config=dict(vars(self.config)),
        )
        return GenerationResult(sequences=sequences, stats=stats)

    def prefill(self, input_ids, attention_mask, max_new_tokens, prefill_batch, prefill_chunk):
        rows = prefill_batch or input_ids.shape[0]
        caches, similarity, first_tokens = [], [], []
        with compress(self.model, self.config, max_new_tokens=max_new_tokens) as session:
            for start in range(0, input_ids.shape[0], rows):
                part = slice(start, start + rows)
                output = session.prefill(input_ids[part], attention_mask[part], prefill_chunk)
                caches.append(session.cache)
                similarity.append(session.similarity)
                first_tokens.append(output.logits[:, -1].argmax(-1))
        return caches, torch.cat(similarity), torch.cat(first_tokens)

    def decode_steps(self, tokens: torch.Tensor, positions: torch.Tensor, steps: int):
        """A function that runs one decode step and returns the next tokens (``[batch]``).

        Must be built and called with the model's attention routed to this generator.
        """
        cache, model = self.cache, self.model
        tokens, positions = tokens.clone(), positions.clone()

        def step() -> torch.Tensor:
            logits = model(input_ids=tokens, position_ids=positions, cache=cache, logits_to_keep=1).logits
            tokens.copy_(logits[:, -1:].argmax(-1))
            positions.add_(1)
            cache.advance()
            return tokens[:, 0]

        if not (self.cuda_graphs and tokens.is_cuda) or steps <= WARM_STEPS:
            return lambda: step().clone()
        with compiled_parts(model, self.architecture) if self.compile_layers else nullcontext():
            return CapturedStep(step, buffers=(tokens, positions))


class CapturedStep:
    """``step`` captured as a CUDA graph after ``WARM_STEPS`` warm-up calls, which are real steps.

    A replay reads and writes the addresses the capture saw. Tensors made before the capture (the
    step's input buffers) are outside the graph's memory pool, so this object keeps them alive: a
    freed one would be handed to the next allocation while every replay still wrote into it.
    """

    def __init__(self, step, buffers: tuple[torch.Tensor, ...]) -> None:
        self.buffers = buffers
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.warmed = [step().clone() for _ in range(WARM_STEPS)]
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = step()

    def __call__(self) -> torch.Tensor:
        if self.warmed:
            return self.warmed.pop(0)
        self.graph.replay()
        return self.output.clone()


def kv_bytes_per_sequence(
    model: nn.Module, config: SqueezeConfig, prompt_tokens: int, new_tokens: int
) -> int:
    """Buffer bytes one sequence needs in the fast engine (on this rank): each layer's budget plus
    the free slot.

    Exact when every sequence of a batch gets the same per-layer budgets (a layer's buffer is as
    wide as the largest budget any sequence gives it).
    """
    tokens = min(config.tokens_per_layer(prompt_tokens), prompt_tokens + new_tokens)
    return (tokens + 1) * kv_bytes_per_token(model)


def kv_bytes_per_token(model: nn.Module) -> int:
    """Key and value bytes one token takes in every layer of a full cache, on this rank (a tensor
    parallel rank holds its share of the heads)."""
    model_config = model.config.get_text_config()
    kv_heads = getattr(model_config, "num_key_value_heads", None) or model_config.num_attention_heads
    head_dim = (
        getattr(model_config, "head_dim", None)
        or model_config.hidden_size // model_config.num_attention_heads
    )
    element = next(model.parameters()).element_size()
    local_heads = kv_heads // tensor_parallel_size(model)
    return model_config.num_hidden_layers * 2 * local_heads * head_dim * element


def largest_batch(
    model: nn.Module, config: SqueezeConfig, prompt_tokens: int, new_tokens: int, kv_memory_bytes: int
) -> int:
    """The most sequences whose compressed caches fit in ``kv_memory_bytes``."""
    return kv_memory_bytes // kv_bytes_per_sequence(model, config, prompt_tokens, new_tokens)
