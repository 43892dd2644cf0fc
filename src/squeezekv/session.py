"""Installing squeezekv on a model: the hooks, the cache swap and the attention entry point.

``compress(model, config)`` is a context manager. Inside it every forward of the model runs on a
:class:`SqueezeCache`: a fresh generation (no cache, or an empty one) gets a new cache; the first
forward is the prefill, after which layer importance is measured, budgets are planned and every
layer is compressed; each later forward appends its tokens and evicts back to the budgets.
Leaving the block always removes the hooks and restores the model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn
from transformers.cache_utils import Cache

from squeezekv.architectures import Architecture, architecture_of, decoder_layers, sliding_window_of
from squeezekv.attention import IMPLEMENTATION, OWNER_ATTRIBUTE
from squeezekv.cache import SqueezeCache
from squeezekv.config import SqueezeConfig
from squeezekv.distributed import agree, model_devices, synchronized, tensor_parallel_group
from squeezekv.importance import ImportanceRecorder

SUPPORTED_ATTENTION = ("sdpa", "eager")


@contextmanager
def routed_attention(
    model: nn.Module, architecture: Architecture, owner: object
) -> Iterator[list[nn.Module]]:
    """Sends every attention of ``model`` through squeezekv, which reads the cache from ``owner.cache``.

    Yields the attention modules; restores the model's own attention on exit.
    """
    implementation = model.config._attn_implementation
    attentions = [getattr(layer, architecture.attention) for layer in decoder_layers(model, architecture)]
    for attention in attentions:
        setattr(attention, OWNER_ATTRIBUTE, owner)
        if architecture.attention_forward is not None:
            attention.forward = architecture.attention_forward.__get__(attention)
    model.config._attn_implementation = IMPLEMENTATION
    try:
        yield attentions
    finally:
        model.config._attn_implementation = implementation
        for attention in attentions:
            attention.__dict__.pop(OWNER_ATTRIBUTE, None)
            attention.__dict__.pop("forward", None)


def checked_implementation(model: nn.Module) -> str:
    implementation = model.config._attn_implementation
    if implementation == IMPLEMENTATION:
        raise ValueError(
            "a squeezekv session is already active on this model; exit it (leave its "
            "`with squeezekv.compress(...)` block) before starting another"
        )
    if implementation not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"squeezekv supports attn_implementation {' or '.join(SUPPORTED_ATTENTION)}, "
            f"not {implementation!r}; load the model with attn_implementation='sdpa'"
        )
    return implementation


class Session:
    """squeezekv installed on one model; ``cache`` is the cache of the latest generation."""

    def __init__(self, model: nn.Module, config: SqueezeConfig, max_new_tokens: int = 0) -> None:
        self.model, self.config, self.max_new_tokens = model, config, max_new_tokens
        self.architecture = architecture_of(model)
        self.layers = decoder_layers(model, self.architecture)
        self.explicit = checked_implementation(model) == "eager"
        config.allocator.check_model(model)
        self.attentions = [getattr(layer, self.architecture.attention) for layer in self.layers]
        self.sliding_windows = [sliding_window_of(model, attention) for attention in self.attentions]
        self.devices = model_devices(model)
        self.group = tensor_parallel_group(model)
        self.reconstructs = config.policy.reconstructs and not config.keeps_everything
        self._prompt: tuple[torch.Tensor, torch.Tensor] | None = None  # what a reconstructing policy repeats
        if self.group is not None and config.policy.spreads_over_heads:
            raise ValueError(
                f"policy {config.policy.name} spreads a layer's budget over all its key-value heads, which "
                "tensor parallelism splits over ranks; run it on one device or under a device_map"
            )
        self.cache: SqueezeCache | None = None
        self.attention_mask: torch.Tensor | None = None  # every column so far, after a prefill
        self.similarity: torch.Tensor | None = None
        self.dispersion: torch.Tensor | None = None  # measured for an allocator that reads it
        self.importance = ImportanceRecorder(len(self.layers), self._is_prefill, lambda: self.cache.new_valid)
        self.prefill_seconds = self.decode_seconds = 0.0
        self.decode_forwards = 0
        self._started = 0.0
        self._installed = ExitStack()

    def _is_prefill(self) -> bool:
        return self.cache is not None and self.cache.phase == "prefill"

    def prefill(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        chunk_tokens: int | None = None,
        question_start: torch.Tensor | None = None,
    ):
        """Prefills a prompt on a fresh cache, in chunks of ``chunk_tokens`` columns if given.

        In chunks, importance is the mean over the prompt seen so far, budgets are planned after
        every chunk for the whole prompt's length and every layer is evicted to them, so the cache
        never holds more than its budgets plus one chunk. ``question_start`` (``[batch]``) is the
        index, among each prompt's real tokens, of its question's first token, for policies that
        observe the question. A policy that ``reconstructs`` gets its second pass over the prompt
        here, before anything is evicted. Returns the last chunk's model output.
        """
        if chunk_tokens is not None and chunk_tokens < 1:
            raise ValueError(f"chunk_tokens {chunk_tokens} must be >= 1")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if self.reconstructs and chunk_tokens is not None:
            raise ValueError(
                f"policy {self.config.policy.spec!r} scores the whole prompt in a second pass before "
                "evicting, so it cannot prefill in chunks: leave chunk_tokens unset"
            )
        columns = input_ids.shape[1]
        chunk = chunk_tokens or columns
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        self._start_generation()
        self.cache.expect_prompt(
            attention_mask.bool(),
            forwards=-(-columns // chunk),
            question_start=question_columns(question_start, attention_mask),
        )
        output = None
        for start in range(0, columns, chunk):
            end = min(start + chunk, columns)
            output = self.model(
                input_ids[:, start:end],
                attention_mask=attention_mask[:, :end],
                position_ids=positions[:, start:end],
                cache=self.cache,
                logits_to_keep=1,
            )
        self.attention_mask = attention_mask
        return output

    def _reconstruct(self) -> None:
        """Feeds the prompt a second time (from inside the prefill's forward hook), scoring every
        original token by the attention the repeating queries give it, then drops the repeat.

        Each repeat starts right after its prompt's last column, padding after it, so that column
        distances (and sliding windows) are the same whatever the batch's padding."""
        cache, (input_ids, attention_mask) = self.cache, self._prompt
        order = torch.sort(attention_mask == 0, dim=1, stable=True).indices  # real tokens first
        repeat_mask = attention_mask.gather(1, order)
        positions = attention_mask.sum(-1, keepdim=True) + torch.arange(
            input_ids.shape[1], device=order.device
        )
        cache.prefill_forwards += 1
        cache.reconstructing = True
        try:
            self.model(
                input_ids.gather(1, order),
                attention_mask=torch.cat([attention_mask, repeat_mask], dim=1),
                position_ids=positions,
                cache=cache,
                logits_to_keep=1,
            )
        finally:
            cache.reconstructing = False
        cache.truncate(input_ids.shape[1])

    def extend(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """Feeds more tokens after the compressed prompt in one forward (a question asked after
        compression); the cache holds its budgets through it, as during decode. ``attention_mask``
        (``[batch, tokens]``) marks padding inside a ragged batch of follow-ups. Returns the model
        output of its last token."""
        if self.cache is None or self.cache.budgets is None:
            raise RuntimeError("extend follows a prefill: call Session.prefill first")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = torch.cat([self.attention_mask, attention_mask.to(self.attention_mask)], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1] :]
        output = self.model(
            input_ids, attention_mask=mask, position_ids=positions, cache=self.cache, logits_to_keep=1
        )
        self.attention_mask = mask
        return output

    def install(self) -> None:
        self._installed.enter_context(routed_attention(self.model, self.architecture, self))
        output_modules = [
            getattr(layer, self.architecture.attention_output)
            if self.architecture.attention_output
            else attention
            for layer, attention in zip(self.layers, self.attentions, strict=True)
        ]
        handles = self.importance.attach(self.layers, output_modules)
        handles.append(self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True))
        handles.append(self.model.register_forward_hook(self._after_forward, with_kwargs=True))
        for handle in handles:
            self._installed.callback(handle.remove)

    def remove(self) -> None:
        self._installed.close()

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if kwargs.get("use_cache") is False:
            raise ValueError("squeezekv compresses the KV cache: use_cache=False leaves nothing to compress")
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs["inputs_embeds"]
        batch, length = tokens.shape[:2]
        cache = kwargs.pop("past_key_values", None)
        cache = kwargs.get("cache") if cache is None else cache
        if not isinstance(cache, SqueezeCache):
            if isinstance(cache, Cache) and cache.get_seq_length() > 0:
                raise ValueError(
                    "squeezekv cannot continue a cache it did not build; start from an empty cache"
                )
            self._start_generation()
            cache = self.cache
        self.cache = kwargs["cache"] = cache
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        if mask is not None and mask.dim() != 2:
            raise ValueError(f"squeezekv needs a 2-D attention mask (batch x columns), got {mask.dim()}-D")
        valid = mask[:, -length:] if mask is not None else torch.ones(batch, length, dtype=torch.bool)
        cache.begin_forward(valid.to(tokens.device))
        if self.reconstructs and cache.phase == "prefill":
            if tokens.dim() != 2:
                raise ValueError(f"policy {self.config.policy.spec!r} repeats the prompt: pass input_ids")
            self._prompt = (tokens, valid.to(tokens.device, torch.long))
        if not cache.reconstructing:  # a forward inside the prefill's: timed as part of it
            self._started = synchronized(self.devices)
        return args, kwargs

    def _start_generation(self) -> None:
        self.cache = SqueezeCache(self.config, self.sliding_windows, self.explicit)
        self.importance.reset()
        self.similarity = self.dispersion = None
        self.prefill_seconds = self.decode_seconds = 0.0
        self.decode_forwards = 0

    def _after_forward(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        cache = self.cache
        if cache.reconstructing:
            return  # the prefill forward around it plans and evicts
        if self.reconstructs and cache.phase == "prefill" and cache.forwards == cache.prefill_forwards:
            self._reconstruct()
        self._plan_and_evict()
        elapsed = synchronized(self.devices) - self._started
        if cache.phase == "prefill":
            self.prefill_seconds += elapsed
        else:
            self.decode_seconds += elapsed
            self.decode_forwards += 1

    def _plan_and_evict(self) -> None:
        """After a prefill forward: measures importance (and the layers' score dispersion, for an
        allocator that reads it) and plans budgets; then evicts to them."""
        cache = self.cache
        if cache.phase == "prefill":
            self.similarity = self.importance.similarity()
            if self.config.allocator.reads_dispersion:
                self.dispersion = cache.score_dispersion()
            budgets = self.config.plan_budgets(
                self.similarity,
                cache.prompt_tokens.cpu(),
                self.sliding_windows,
                self.max_new_tokens,
                cache.head_dims,
                self.dispersion,
            )
            cache.budgets = agree(budgets, self.group, self.devices[0])
            bits = self.config.plan_bits(self.similarity)
            cache.layer_bits = None if bits is None else agree(bits, self.group, self.devices[0])
        cache.evict()


def question_columns(
    question_start: torch.Tensor | None, attention_mask: torch.Tensor
) -> torch.Tensor | None:
    """Columns of each prompt's first question token, from indices among its real (left-padded) tokens."""
    if question_start is None:
        return None
    question_start = torch.as_tensor(question_start, device=attention_mask.device).view(-1)
    real = attention_mask.sum(-1)
    if question_start.shape[0] != real.shape[0] or bool(
        ((question_start < 0) | (question_start >= real)).any()
    ):
        raise ValueError(
            f"question_start {question_start.tolist()} must give, for each of the {real.shape[0]} prompts, "
            f"an index among its tokens (lengths {real.tolist()})"
        )
    return attention_mask.shape[1] - real + question_start


@contextmanager
def compress(model: nn.Module, config: SqueezeConfig, max_new_tokens: int = 0) -> Iterator[Session]:
    """Applies squeezekv to every forward of ``model`` inside the block (``model.generate`` too).

    ``max_new_tokens`` tells the planner how many tokens will follow the prompt, so that a layer's
    budget may cover them; leave it at 0 when unknown (budgets are then capped at the prompt).
    """
    session = Session(model, config, max_new_tokens)
    session.install()
    try:
        yield session
    finally:
        session.remove()
