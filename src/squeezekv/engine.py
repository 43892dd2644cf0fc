"""The fast engine: greedy generation with static-shape decode steps on a :class:`StaticCache`.

After prefill every layer's budget is fixed, so the decode step has the same shapes every step
(see :mod:`squeezekv.cache.static`) and is captured as one CUDA graph on the GPU; on the CPU the
same code runs eagerly. It keeps exactly the tokens the simple path keeps.

Prefill runs through the simple path (``squeezekv.compress``) in micro-batches, each compressed
before the next starts, so the prompt's full cache exists for one micro-batch at a time and the
decode batch can be as large as the compressed caches allow.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext

import torch
from torch import nn

from squeezekv.allocators.precision import PrecisionAllocator
from squeezekv.architectures import Architecture, architecture_of, decoder_layers
from squeezekv.cache import StaticCache
from squeezekv.cache.quantized import packed_bytes_per_head
from squeezekv.config import SqueezeConfig
from squeezekv.distributed import model_devices, synchronized, tensor_parallel_size
from squeezekv.fusion import fused_projections, replaced_forward
from squeezekv.generation import GenerationResult, GenerationStats, check_prompt
from squeezekv.session import compress, routed_attention

WARM_STEPS = 2  # eager decode steps before a CUDA graph is captured
STOP_CHECK = 8  # decode steps between checks (a host sync each) for an early stop


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
    with ExitStack() as stack:
        for module in modules:
            compiled = torch.compile(module.forward, backend=backend, fullgraph=True)
            stack.enter_context(replaced_forward(module, compiled))
        for name, function in functions.items():
            setattr(namespace, name, torch.compile(function, backend=backend, fullgraph=True))
            stack.callback(setattr, namespace, name, function)
        yield


def check_fast_engine(config: SqueezeConfig) -> None:
    """Refuses, naming it, what the fast engine cannot run: bits planned per sequence."""
    if isinstance(config.allocator, PrecisionAllocator):
        raise ValueError(
            f"the fast engine stores every sequence of a layer at one precision: allocator "
            f"{config.allocator.name!r} plans bits per sequence and runs on the simple path only "
            "(squeezekv.generate, --engine simple); a fixed kv_bits runs on both"
        )


class FastGenerator:
    """Greedy generation with squeezekv: micro-batched prefill, then static decode steps
    (one CUDA graph per step on the GPU).

    With ``compile_layers``, the captured step runs the layers' norms, dense MLPs and rotary
    embeddings compiled (:func:`compiled_parts`), so that their chains of small kernels become a
    few, and every decode step runs each layer's query, key and value projections, and a gated
    MLP's gate and up projections, as one matrix product (:func:`~squeezekv.fusion.fused_projections`);
    not under tensor parallelism, whose communication hooks sit on the projections.
    """

    def __init__(
        self, model: nn.Module, config: SqueezeConfig, cuda_graphs: bool = True, compile_layers: bool = True
    ) -> None:
        check_fast_engine(config)
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
        question_start: torch.Tensor | None = None,
        followup_ids: torch.Tensor | None = None,
        followup_mask: torch.Tensor | None = None,
        stop_token_id: int | None = None,
    ) -> GenerationResult:
        """Greedy continuation of a (left-padded) batch.

        The prefill runs ``prefill_batch`` sequences at a time and, with ``prefill_chunk``, that
        many columns at a time, compressing after each chunk (see :meth:`Session.prefill`, which
        also takes ``question_start``). ``followup_ids`` (``[batch, tokens]``, padding marked by
        ``followup_mask``) are fed after the prompt is compressed, as a question asked later
        (:meth:`Session.extend`); the answer follows them. With ``stop_token_id``, decoding ends
        early once every sequence has produced it (the rest of ``new_tokens`` is filled with it).
        """
        check_prompt(self.model, input_ids, attention_mask, max_new_tokens, self.config)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if followup_ids is not None and followup_mask is None:
            followup_mask = torch.ones_like(followup_ids)
        started = time.perf_counter()
        caches, similarity, first_tokens, attention_mask = self.prefill(
            input_ids, attention_mask, max_new_tokens, prefill_batch, prefill_chunk,
            question_start, followup_ids, followup_mask,
        )  # fmt: skip
        self.cache = StaticCache(caches, self.config, max_new_tokens)
        prefill_seconds = synchronized(self.devices) - started
        new_tokens = torch.empty(
            input_ids.shape[0], max_new_tokens, dtype=torch.long, device=input_ids.device
        )
        new_tokens[:, 0] = first_tokens
        positions = attention_mask.sum(-1, keepdim=True)
        started = time.perf_counter()
        steps = max_new_tokens - 1
        joined = fused_projections(self.model, self.architecture) if self.compile_layers else nullcontext()
        with routed_attention(self.model, self.architecture, self), joined:
            step = self.decode_steps(new_tokens[:, :1], positions, max_new_tokens - 1)
            for index in range(1, max_new_tokens):
                if index == WARM_STEPS + 1:
                    steady_started = synchronized(self.devices)
                new_tokens[:, index] = step()
                if (
                    stop_token_id is not None
                    and index % STOP_CHECK == 0
                    and finished(new_tokens, index, stop_token_id)
                ):
                    new_tokens[:, index + 1 :] = stop_token_id
                    steps = index
                    break
        finished_at = synchronized(self.devices)
        decode_seconds = finished_at - started
        if steps > WARM_STEPS:
            self.steady_step_seconds = (finished_at - steady_started) / (steps - WARM_STEPS)
        sequences = torch.cat([input_ids, new_tokens], dim=1)
        stats = GenerationStats.of(
            self.cache, self.config, similarity, prefill_seconds, decode_seconds, steps
        )
        return GenerationResult(sequences=sequences, stats=stats)

    def prefill(
        self, input_ids, attention_mask, max_new_tokens, prefill_batch, prefill_chunk,
        question_start, followup_ids, followup_mask,
    ):  # fmt: skip
        rows = prefill_batch or input_ids.shape[0]
        caches, similarity, first_tokens, masks = [], [], [], []
        with compress(self.model, self.config, max_new_tokens=max_new_tokens) as session:
            for start in range(0, input_ids.shape[0], rows):
                part = slice(start, start + rows)
                questions = None if question_start is None else question_start[part]
                output = session.prefill(input_ids[part], attention_mask[part], prefill_chunk, questions)
                if followup_ids is not None:
                    output = session.extend(followup_ids[part], followup_mask[part])
                caches.append(session.cache)
                similarity.append(session.similarity)
                first_tokens.append(output.logits[:, -1].argmax(-1))
                masks.append(session.attention_mask)
        return caches, torch.cat(similarity), torch.cat(first_tokens), torch.cat(masks)

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

            def eager_step() -> torch.Tensor:
                new = step().clone()
                cache.after_step()
                return new

            return eager_step
        with compiled_parts(model, self.architecture) if self.compile_layers else nullcontext():
            return CapturedStep(step, cache.after_step, buffers=(tokens, positions))


def finished(new_tokens: torch.Tensor, index: int, stop_token_id: int) -> bool:
    """Whether every sequence has produced ``stop_token_id`` among its first ``index + 1`` new tokens."""
    return bool((new_tokens[:, : index + 1] == stop_token_id).any(-1).all())


class CapturedStep:
    """``step`` captured as a CUDA graph after ``WARM_STEPS`` warm-up calls, which are real steps;
    ``after`` runs on the host after every real step (warm-up or replay), outside the graph.

    A replay reads and writes the addresses the capture saw. Tensors made before the capture (the
    step's input buffers) are outside the graph's memory pool, so this object keeps them alive: a
    freed one would be handed to the next allocation while every replay still wrote into it.
    """

    def __init__(self, step, after, buffers: tuple[torch.Tensor, ...]) -> None:
        self.buffers, self.after = buffers, after
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.warmed = []
            for _ in range(WARM_STEPS):
                self.warmed.append(step().clone())
                after()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = step()

    def __call__(self) -> torch.Tensor:
        if self.warmed:
            return self.warmed.pop(0)
        self.graph.replay()
        self.after()
        return self.output.clone()


def kv_bytes_per_sequence(
    model: nn.Module, config: SqueezeConfig, prompt_tokens: int, new_tokens: int
) -> int:
    """Buffer bytes one sequence needs in the fast engine (on this rank): each layer's budget plus
    the free slot, at ``config.kv_bits`` (packed: with the residual window and key-group table).

    Exact when every sequence of a batch gets the same per-layer budgets (a layer's buffer is as
    wide as the largest budget any sequence gives it) and, when packed, its whole prompt was
    quantized at once.
    """
    tokens = min(config.tokens_per_layer(prompt_tokens, new_tokens), prompt_tokens + new_tokens)
    layers, heads, head_dim, element = kv_geometry(model)
    if config.kv_bits == 16:
        return (tokens + 1) * kv_bytes_per_token(model)
    dims = (head_dim, head_dim)
    per_head = packed_bytes_per_head(
        config.kv_bits, dims, tokens + 1, tokens, new_tokens, element, config.kv_group
    )
    return layers * heads * per_head


def kv_geometry(model: nn.Module) -> tuple[int, int, int, int]:
    """Layers, key-value heads on this rank (a tensor parallel rank holds its share), head size and
    bytes per element of the model's cache."""
    model_config = model.config.get_text_config()
    kv_heads = getattr(model_config, "num_key_value_heads", None) or model_config.num_attention_heads
    head_dim = (
        getattr(model_config, "head_dim", None)
        or model_config.hidden_size // model_config.num_attention_heads
    )
    element = next(model.parameters()).element_size()
    return model_config.num_hidden_layers, kv_heads // tensor_parallel_size(model), head_dim, element


def kv_bytes_per_token(model: nn.Module) -> int:
    """Key and value bytes one token takes in every layer of a full cache, on this rank."""
    layers, heads, head_dim, element = kv_geometry(model)
    return layers * 2 * heads * head_dim * element


def largest_batch(
    model: nn.Module, config: SqueezeConfig, prompt_tokens: int, new_tokens: int, kv_memory_bytes: int
) -> int:
    """The most sequences whose compressed caches fit in ``kv_memory_bytes``."""
    return kv_memory_bytes // kv_bytes_per_sequence(model, config, prompt_tokens, new_tokens)
