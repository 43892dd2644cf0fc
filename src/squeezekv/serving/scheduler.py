"""Continuous batching over compressed caches: requests join and leave the decode batch at any step.

Each iteration of :meth:`ServingEngine.step` admits the next waiting request if its KV fits, runs
one chunk of the request being prefilled, then one decode step for every running request. A
prefill goes through the simple path (:class:`~squeezekv.session.Session`: the request alone, its
own importance and budgets); once done, its compressed layers move into the block pool, each at
its own budget, and the request joins the decode batch. A finished or cancelled request's blocks
go back to the pool at once, which admits the next waiting request.

Admission reserves, before the prefill, the most blocks the request's compressed layers can take
(the allocators keep a request's total at ``layers x tokens_per_layer``; each layer adds its free
slot and a partly used block), so requests in the pool never exceed ``kv_memory`` bytes. The
prompt's uncompressed cache during its prefill lives outside the pool, one request at a time (a
chunk of it with ``prefill_chunk``).

With ``prefill_chunk`` unset the prefill is the whole prompt in one forward and every request's
greedy tokens are those of ``squeezekv.generate`` run on it alone; with chunks they are those of
the fast engine's chunked prefill (importance and budgets planned on the prompt seen so far).
"""

from __future__ import annotations

import itertools
import threading
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from squeezekv.architectures import architecture_of
from squeezekv.cache import SqueezeCache
from squeezekv.config import SqueezeConfig
from squeezekv.engine import kv_bytes_per_token
from squeezekv.generation import check_prompt
from squeezekv.serving.batch import Arena, DecodeSteps, PagedCache
from squeezekv.serving.store import BlockPool, LayerSlots, blocks_for, store_layer
from squeezekv.session import Session, routed_attention

Listener = Callable[[str, object], None]  # ("token", id) / ("finish", reason) / ("error", message)


class QueueFull(Exception):
    """The waiting queue is at its limit; the caller should retry later."""


@dataclass(eq=False)
class Request:
    """One generation request; ``listener`` is called from the engine's thread."""

    prompt: list[int]
    max_tokens: int
    config: SqueezeConfig
    listener: Listener
    stop_tokens: frozenset[int] = frozenset()
    id: int = field(default_factory=itertools.count().__next__)
    cancelled: bool = False
    finished: bool = False
    reserved_blocks: int = 0
    generated: int = 0


@dataclass(eq=False)
class Prefill:
    request: Request
    session: Session
    cache: SqueezeCache
    input_ids: torch.Tensor
    done: int = 0


@dataclass(eq=False)
class Running:
    request: Request
    slots: list[LayerSlots]
    column: int
    prompt_columns: int
    last_token: int


def unservable(config: SqueezeConfig) -> str | None:
    """Why the block store cannot serve ``config`` (``None``: it can)."""
    policy = config.policy
    if policy.spreads_over_heads:
        return f"policy {policy.spec!r} gives each key-value head its own budget (packed per-head storage)"
    if policy.observes_question:
        return f"policy {policy.spec!r} observes each prompt's question, whose start requests do not carry"
    if config.plans_bits:
        return (
            f"kv_bits={config.kv_bits} and allocator {config.allocator.spec!r} quantize keys and values, "
            "which only the simple path stores"
        )
    return None


class ServingEngine:
    """Greedy continuous batching of ``model`` with ``config`` (requests may override the budget).

    ``kv_memory`` bytes of paged KV storage in ``block_size``-slot blocks; at most ``max_waiting``
    requests wait for admission (more raise :class:`QueueFull`). With ``cuda_graphs`` each decode
    step's shape is captured as a CUDA graph on the GPU; it is off by default because the capture
    has not yet been run on a GPU (``squeezekv bench --workload`` turns it on to measure it).
    """

    def __init__(
        self,
        model: nn.Module,
        config: SqueezeConfig,
        kv_memory: int,
        block_size: int = 16,
        max_waiting: int = 64,
        prefill_chunk: int | None = None,
        cuda_graphs: bool = False,
    ) -> None:
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk {prefill_chunk} must be >= 1")
        if max_waiting < 1:
            raise ValueError(f"max_waiting {max_waiting} must be >= 1")
        refused = unservable(config)
        if refused:
            raise ValueError(f"{refused}: the server cannot serve it yet")
        self.model, self.config = model, config
        self.architecture = architecture_of(model)
        self.explicit = Session(model, config).explicit  # the probe checks the model
        self.prefill_chunk, self.max_waiting = prefill_chunk, max_waiting
        text = model.config.get_text_config()
        self.layers = text.num_hidden_layers
        kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        per_block = kv_bytes_per_token(model) // self.layers * block_size
        blocks = kv_memory // per_block + 1  # + the padding block, which holds nothing
        if blocks < 2:
            raise ValueError(f"kv_memory {kv_memory} bytes is less than one block ({per_block} bytes)")
        parameter = next(model.parameters())
        self.pool = BlockPool(blocks, block_size, kv_heads, head_dim, parameter.dtype, parameter.device)
        self.arena = Arena(parameter.device)  # the decode batch's static buffers
        self.decode_steps = DecodeSteps(model, self.arena, cuda_graphs)
        self.kv_memory = kv_memory
        self.cache = None  # what squeezekv's attention reads while a decode step runs
        self.waiting: deque[Request] = deque()
        self.prefilling: Prefill | None = None
        self.running: list[Running] = []
        self.batch: PagedCache | None = None
        self.finished = Counter()  # requests ended, by reason: stop, length, cancelled, error
        self.wakeup = threading.Condition()

    # -- called from any thread ---------------------------------------------------------------

    def submit(self, request: Request) -> None:
        """Queues ``request``; refuses (``ValueError``) one that could never fit or that changes the
        policy (the decode batch ranks all rows with one), and raises :class:`QueueFull` when
        ``max_waiting`` requests already wait."""
        if request.config.policy != self.config.policy:
            raise ValueError(
                f"policy {request.config.policy.name!r} differs from the server's "
                f"{self.config.policy.name!r}; a request may change the budget and the allocator only"
            )
        check_prompt(self.model, torch.tensor([request.prompt]), None, request.max_tokens, request.config)
        request.reserved_blocks = self.blocks_needed(len(request.prompt), request.max_tokens, request.config)
        if request.reserved_blocks > self.pool.usable_blocks:
            raise ValueError(
                f"a {len(request.prompt)}-token prompt with max_tokens {request.max_tokens} needs "
                f"{request.reserved_blocks * self.pool.bytes_per_block} bytes of KV at budget "
                f"{request.config.budget}, more than the server's whole kv_memory of {self.kv_memory} bytes"
            )
        with self.wakeup:
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (the limit is {self.max_waiting})")
            self.waiting.append(request)
            self.wakeup.notify()

    def cancel(self, request: Request) -> None:
        """Marks ``request`` cancelled; the engine drops it and frees its memory at its next step."""
        with self.wakeup:
            request.cancelled = True
            self.wakeup.notify()

    def blocks_needed(self, prompt_tokens: int, max_tokens: int, config: SqueezeConfig) -> int:
        """The most blocks a request's compressed layers can take (see the module's docstring)."""
        per_layer = min(config.tokens_per_layer(prompt_tokens, max_tokens), prompt_tokens + max_tokens)
        return blocks_for(self.layers * (per_layer + 1), self.pool.block_size) + self.layers

    # -- the engine's thread ------------------------------------------------------------------

    def serve_forever(self, stop: threading.Event) -> None:
        """Steps until ``stop`` is set, sleeping while there is nothing to do. A failed decode step
        ends every running request with the error and the engine goes on with the next ones."""
        while not stop.is_set():
            try:
                worked = self.step()
            except Exception as error:
                self._fail_running(f"decode step failed: {type(error).__name__}: {error}")
                continue
            if not worked:
                with self.wakeup:
                    if not self.waiting and not stop.is_set():
                        self.wakeup.wait(timeout=0.05)

    @torch.inference_mode()
    def step(self) -> bool:
        """One iteration: drop cancelled requests, admit, one prefill chunk, one decode step.
        Returns whether there was anything to do."""
        self._drop_cancelled()
        if self.prefilling is None:
            self._admit()
        worked = False
        if self.prefilling is not None:
            self._prefill_chunk()
            worked = True
        if self.running:
            self._decode_step()
            worked = True
        return worked

    @property
    def kv_bytes_in_use(self) -> int:
        return (self.pool.usable_blocks - len(self.pool.free_blocks)) * self.pool.bytes_per_block

    @property
    def in_flight(self) -> int:
        return len(self.running) + (self.prefilling is not None)

    def _drop_cancelled(self) -> None:
        with self.wakeup:
            gone = [request for request in self.waiting if request.cancelled]
            self.waiting = deque(request for request in self.waiting if not request.cancelled)
        if self.prefilling is not None and self.prefilling.request.cancelled:
            gone.append(self.prefilling.request)
            self.prefilling = None
        for row in [row for row in self.running if row.request.cancelled]:
            gone.append(row.request)
            self._leave(row)
        for request in gone:
            self._finish(request, "finish", "cancelled")

    def _admit(self) -> None:
        with self.wakeup:
            if not self.waiting:
                return
            request = self.waiting[0]
            if request.reserved_blocks > len(self.pool.free_blocks):
                return  # waits until finished requests free enough blocks
            self.waiting.popleft()
        session = Session(self.model, request.config, max_new_tokens=request.max_tokens)
        cache = SqueezeCache(request.config, session.sliding_windows, session.explicit)
        input_ids = torch.tensor([request.prompt], device=self.pool.keys.device)
        chunk = self.prefill_chunk or input_ids.shape[1]
        cache.expect_prompt(
            torch.ones_like(input_ids, dtype=torch.bool), forwards=-(-input_ids.shape[1] // chunk)
        )
        self.prefilling = Prefill(request, session, cache, input_ids)

    def _prefill_chunk(self) -> None:
        prefill = self.prefilling
        length = prefill.input_ids.shape[1]
        start, end = prefill.done, min(prefill.done + (self.prefill_chunk or length), length)
        prefill.session.install()
        try:
            output = self.model(
                prefill.input_ids[:, start:end],
                attention_mask=torch.ones_like(prefill.input_ids[:, :end]),
                position_ids=torch.arange(start, end, device=prefill.input_ids.device)[None],
                cache=prefill.cache,
                logits_to_keep=1,
            )
        except Exception as error:  # one request's failure must not stop the others
            self.prefilling = None
            self._finish(prefill.request, "error", f"prefill failed: {type(error).__name__}: {error}")
            return
        finally:
            prefill.session.remove()
        prefill.done = end
        if end < length:
            return
        self.prefilling = None
        budgets = prefill.cache.budgets[0].tolist()
        slots = []
        for layer, budget in zip(prefill.cache.layers, budgets, strict=True):
            slots.append(store_layer(self.pool, layer, int(budget)))
            layer.reset()  # one layer at a time: the move needs one layer's worth of extra memory
        row = Running(prefill.request, slots, column=length, prompt_columns=length, last_token=-1)
        self._add_token(row, int(output.logits[0, -1].argmax()))
        if not row.request.finished:
            self._join(row)
        else:
            self._release(row)

    def _decode_step(self) -> None:
        if self.batch is None:
            self._rebuild_batch()
        batch = self.batch
        self.cache = batch
        try:
            with routed_attention(self.model, self.architecture, self):
                self.decode_steps.run(batch)
        finally:
            self.cache = None
        finished = []
        for row, token in zip(self.running, batch.next_tokens(), strict=True):
            row.column += 1
            self._add_token(row, token)
            if row.request.finished:
                finished.append(row)
        for row in finished:
            self._leave(row)

    def _fail_running(self, message: str) -> None:
        for row in list(self.running):
            self._finish(row.request, "error", message)
            self._leave(row)

    def _add_token(self, row: Running, token: int) -> None:
        request = row.request
        row.last_token = token
        request.generated += 1
        if token in request.stop_tokens:
            self._finish(request, "finish", "stop")
            return
        request.listener("token", token)
        if request.generated >= request.max_tokens:
            self._finish(request, "finish", "length")

    def _finish(self, request: Request, kind: str, value: str) -> None:
        if not request.finished:
            request.finished = True
            self.finished[value if kind == "finish" else "error"] += 1
            request.listener(kind, value)

    def _join(self, row: Running) -> None:
        self._detach_batch()
        self.running.append(row)

    def _leave(self, row: Running) -> None:
        self._detach_batch()
        self.running.remove(row)
        self._release(row)

    def _release(self, row: Running) -> None:
        self.pool.release([block for layer in row.slots for block in layer.blocks])
        row.slots = []

    def _detach_batch(self) -> None:
        if self.batch is not None:
            self.batch.store_back()
            self.batch = None

    def _rebuild_batch(self) -> None:
        policy = self.config.policy
        scored = policy.scored_queries("decode", 1) > 0 and any(
            not row.request.config.keeps_everything for row in self.running
        )
        self.batch = PagedCache(
            self.pool,
            self.arena,
            [row.slots for row in self.running],
            self.config,
            [row.column for row in self.running],
            [row.prompt_columns for row in self.running],
            [row.last_token for row in self.running],
            scored,
            self.explicit,
        )
