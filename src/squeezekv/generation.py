"""``squeezekv.generate``: ``model.generate`` with a compressed cache, plus what it measured."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from squeezekv.cache import CompressedCache
from squeezekv.config import SqueezeConfig
from squeezekv.session import compress


@dataclass
class GenerationStats:
    """What one compressed generation did. Per-layer tensors are ``[batch, layers]``."""

    layer_similarity: torch.Tensor
    layer_budget: torch.Tensor
    layer_tokens_held: torch.Tensor
    prompt_tokens: list[int]
    kv_bytes_full: int
    kv_bytes_kept: int
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int
    config: dict = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        cache: CompressedCache,
        config: SqueezeConfig,
        similarity: torch.Tensor,
        prefill_seconds: float,
        decode_seconds: float,
        decode_steps: int,
    ) -> GenerationStats:
        """The stats of a generation that ended with ``cache`` (either kind)."""
        return cls(
            layer_similarity=similarity,
            layer_budget=cache.budgets,
            layer_tokens_held=cache.held_tokens(),
            prompt_tokens=cache.prompt_tokens.tolist(),
            kv_bytes_full=cache.kv_bytes_full(),
            kv_bytes_kept=cache.kv_bytes_kept(),
            prefill_seconds=prefill_seconds,
            decode_seconds=decode_seconds,
            decode_steps=decode_steps,
            config=config.to_dict(),
        )

    @property
    def kv_fraction_kept(self) -> float:
        return self.kv_bytes_kept / self.kv_bytes_full if self.kv_bytes_full else 1.0

    def to_dict(self) -> dict:
        return {
            "config": self.config,
            "prompt_tokens": self.prompt_tokens,
            "layer_similarity": [[round(v, 6) for v in row] for row in self.layer_similarity.tolist()],
            "layer_budget": self.layer_budget.tolist(),
            "layer_tokens_held": self.layer_tokens_held.tolist(),
            "kv_bytes_full": self.kv_bytes_full,
            "kv_bytes_kept": self.kv_bytes_kept,
            "kv_fraction_kept": round(self.kv_fraction_kept, 6),
            "prefill_seconds": round(self.prefill_seconds, 6),
            "decode_seconds": round(self.decode_seconds, 6),
            "decode_steps": self.decode_steps,
        }


@dataclass
class GenerationResult:
    sequences: torch.Tensor
    stats: GenerationStats


def check_prompt(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    max_new_tokens: int,
    config: SqueezeConfig,
) -> None:
    """Rejects prompts the model cannot take and budgets too small for them, before any compute."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be 2-D (batch x tokens), got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        real = [input_ids.shape[1]] * input_ids.shape[0]
    else:
        real = attention_mask.sum(-1).tolist()
    if input_ids.numel() == 0 or min(real) == 0:
        raise ValueError("empty prompt: every sequence needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens {max_new_tokens} must be >= 1")
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and input_ids.shape[1] > limit:
        raise ValueError(
            f"prompt of {input_ids.shape[1]} tokens exceeds the model's maximum of {limit} positions"
        )
    if limit is not None and input_ids.shape[1] + max_new_tokens > limit:
        raise ValueError(
            f"prompt of {input_ids.shape[1]} tokens + {max_new_tokens} new tokens exceeds the model's "
            f"maximum of {limit} positions"
        )
    for tokens in real:
        config.tokens_per_layer(int(tokens))


def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    config: SqueezeConfig,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    **generation_kwargs,
) -> GenerationResult:
    """``model.generate`` on a squeezekv cache; ``sequences`` are prompt + new tokens as there."""
    check_prompt(model, input_ids, attention_mask, max_new_tokens, config)
    with compress(model, config, max_new_tokens=max_new_tokens) as session:
        sequences = model.generate(
            input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, **generation_kwargs
        )
        stats = GenerationStats.of(
            session.cache,
            config,
            session.similarity,
            session.prefill_seconds,
            session.decode_seconds,
            session.decode_forwards,
        )
        return GenerationResult(sequences=sequences, stats=stats)
