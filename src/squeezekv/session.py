"""Installing squeezekv on a model: the hooks, the cache swap and the attention entry point.

``compress(model, config)`` is a context manager. Inside it every forward of the model runs on a
:class:`SqueezeCache`: a fresh generation (no cache, or an empty one) gets a new cache; the first
forward is the prefill, after which layer importance is measured, budgets are planned and every
layer is compressed; each later forward appends its tokens and evicts back to the budgets.
Leaving the block always removes the hooks and restores the model.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.cache_utils import Cache

from squeezekv.allocators import plan_budgets
from squeezekv.architectures import architecture_of, decoder_layers, sliding_window_of
from squeezekv.attention import IMPLEMENTATION, attend, layer_mask
from squeezekv.cache import SqueezeCache
from squeezekv.config import SqueezeConfig
from squeezekv.importance import ImportanceRecorder
from squeezekv.policies import POLICIES

SUPPORTED_ATTENTION = ("sdpa", "eager")
_SESSION_ATTRIBUTE = "_squeezekv_session"


def squeezekv_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface entry: attention over this layer's compressed cache."""
    session: Session | None = getattr(module, _SESSION_ATTRIBUTE, None)
    if session is None or session.cache is None:
        raise RuntimeError("squeezekv attention called outside squeezekv.compress(...)")
    cache, config = session.cache, session.config
    layer = cache.layers[module.layer_idx]
    if sliding_window != layer.sliding_window and sliding_window is not None:
        raise RuntimeError(
            f"layer {module.layer_idx}: sliding window {sliding_window} != {layer.sliding_window}"
        )
    queries = query.shape[2]
    columns = torch.arange(layer.seen - queries, layer.seen, device=query.device)
    mask = layer_mask(layer.positions, layer.valid, columns, layer.sliding_window)
    scored = POLICIES[config.policy].scored_queries(cache.phase, queries, config)
    output, mass = attend(
        query,
        key,
        value,
        mask,
        scaling if scaling is not None else query.shape[-1] ** -0.5,
        scored_queries=scored,
        query_valid=cache.new_valid,
        softcap=softcap,
        explicit=session.explicit,
    )
    if mass is not None:
        layer.add_mass(mass, cache.phase, config)
    return output.transpose(1, 2).contiguous(), None


AttentionInterface.register(IMPLEMENTATION, squeezekv_attention)


class Session:
    """squeezekv installed on one model; ``cache`` is the cache of the latest generation."""

    def __init__(self, model: nn.Module, config: SqueezeConfig, max_new_tokens: int = 0) -> None:
        self.model, self.config, self.max_new_tokens = model, config, max_new_tokens
        self.architecture = architecture_of(model)
        self.layers = decoder_layers(model, self.architecture)
        config.check_layers(len(self.layers))
        implementation = model.config._attn_implementation
        if implementation not in SUPPORTED_ATTENTION:
            raise ValueError(
                f"squeezekv supports attn_implementation {' or '.join(SUPPORTED_ATTENTION)}, "
                f"not {implementation!r}; load the model with attn_implementation='sdpa'"
            )
        self.implementation = implementation
        self.explicit = implementation == "eager"
        self.attentions = [getattr(layer, self.architecture.attention) for layer in self.layers]
        self.sliding_windows = [sliding_window_of(model, attention) for attention in self.attentions]
        self.cache: SqueezeCache | None = None
        self.similarity: torch.Tensor | None = None
        self.importance = ImportanceRecorder(len(self.layers), self._is_prefill, lambda: self.cache.new_valid)
        self.prefill_seconds = self.decode_seconds = 0.0
        self.decode_forwards = 0
        self._started = 0.0
        self._handles = []

    def _is_prefill(self) -> bool:
        return self.cache is not None and self.cache.forwards == 1

    def install(self) -> None:
        output_modules = [
            getattr(layer, self.architecture.attention_output)
            if self.architecture.attention_output
            else attention
            for layer, attention in zip(self.layers, self.attentions, strict=True)
        ]
        self._handles = self.importance.attach(self.layers, output_modules)
        self._handles.append(self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._after_forward, with_kwargs=True))
        for attention in self.attentions:
            setattr(attention, _SESSION_ATTRIBUTE, self)
            if self.architecture.attention_forward is not None:
                attention.forward = self.architecture.attention_forward.__get__(attention)
        self.model.config._attn_implementation = IMPLEMENTATION

    def remove(self) -> None:
        self.model.config._attn_implementation = self.implementation
        for attention in self.attentions:
            attention.__dict__.pop(_SESSION_ATTRIBUTE, None)
            attention.__dict__.pop("forward", None)
        for handle in self._handles:
            handle.remove()
        self._handles = []

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
        self._started = self._clock(tokens.device)
        return args, kwargs

    def _start_generation(self) -> None:
        self.cache = SqueezeCache(self.config, self.sliding_windows)
        self.importance.reset()
        self.similarity = None
        self.prefill_seconds = self.decode_seconds = 0.0
        self.decode_forwards = 0

    def _after_forward(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        cache = self.cache
        if cache.phase == "prefill":
            self.similarity = self.importance.similarity()
            cache.budgets = plan_budgets(
                self.similarity,
                cache.prompt_tokens.cpu(),
                self.config,
                self.sliding_windows,
                self.max_new_tokens,
            )
        cache.evict()
        elapsed = self._clock(cache.new_valid.device) - self._started
        if cache.phase == "prefill":
            self.prefill_seconds = elapsed
        else:
            self.decode_seconds += elapsed
            self.decode_forwards += 1

    @staticmethod
    def _clock(device: torch.device) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()


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
