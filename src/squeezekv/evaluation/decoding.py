"""Running a model on the full cache or on a squeezekv cache, the same way for both.

``config=None`` means the model's own full cache; a :class:`QuantizedFullCache` is transformers'
``QuantizedCache`` (every token kept, stored in fewer bits: the peer of squeezekv's ``kv_bits``);
otherwise every forward runs inside ``squeezekv.compress``, so a compressed prompt keeps evicting
while later tokens are fed in.
"""

from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass

import torch
from torch import nn

import squeezekv
from squeezekv import SqueezeConfig
from squeezekv.engine import FastGenerator


@dataclass
class Decoded:
    """``logits[b, t]`` predicts ``tokens[b, t]``; ``kv_tokens`` is the mean tokens held per layer."""

    logits: torch.Tensor
    tokens: torch.Tensor
    kv_tokens: float


INSTALL_QUANTO = 'pip install "squeezekv[quanto]"'


@dataclass(frozen=True)
class QuantizedFullCache:
    """transformers' ``QuantizedCache`` on the quanto backend: every token kept, ``bits`` per key and
    value element in groups of channels with a scale and a shift, the newest ``residual`` tokens
    unquantized (transformers' defaults but the bits; a group is 64 channels, or the head size when
    that is smaller, since quanto needs a group to divide every tensor it stores)."""

    bits: int
    residual: int = 128

    BITS = (2, 4)  # what the quanto backend stores

    def __post_init__(self) -> None:
        if self.bits not in self.BITS:
            raise ValueError(f"transformers' QuantizedCache stores 2 or 4 bits, not {self.bits!r}")

    def new_cache(self, model: nn.Module):
        if importlib.util.find_spec("optimum") is None or importlib.util.find_spec("optimum.quanto") is None:
            raise ValueError(
                f"transformers' QuantizedCache needs the optimum-quanto package: {INSTALL_QUANTO}"
            )
        from transformers.cache_utils import QuantizedCache

        config = model.config.get_text_config()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return QuantizedCache(
            backend="quanto", config=model.config, nbits=self.bits, q_group_size=min(64, head_dim),
            residual_length=self.residual,
        )  # fmt: skip


def stored_bytes(tensor: torch.Tensor) -> int:
    """The bytes a tensor holds, through quanto's wrappers (a packed 4-bit tensor reports its
    unpacked shape; its inner ``uint8`` tensor is what is stored)."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(stored_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def quantized_cache_tokens(cache) -> float:
    """The bytes a ``QuantizedCache`` holds per layer and row, in 16-bit tokens' bytes (the unit of
    squeezekv's ``equal_bytes`` budgets): packed codes as stored, each scale and shift at 2 bytes,
    the residual window at 16 bits (left padding included, as stored); the mean over layers."""
    shares = []
    for layer in cache.layers:
        rows, heads, _, dim = layer._quantized_keys.shape
        total = 2 * (layer.keys.numel() + layer.values.numel())
        for codes in (layer._quantized_keys, layer._quantized_values):
            total += stored_bytes(codes._data) + 2 * (codes._scale.numel() + codes._shift.numel())
        shares.append(total / (2 * 2 * heads * dim) / rows)
    return sum(shares) / len(shares)


def session_for(model: nn.Module, config: SqueezeConfig | QuantizedFullCache | None, new_tokens: int):
    """A squeezekv session for a squeezekv configuration; nothing for the model's own caches."""
    if isinstance(config, SqueezeConfig):
        return squeezekv.compress(model, config, new_tokens)
    return contextlib.nullcontext()


@torch.inference_mode()
def decode(
    model: nn.Module,
    prompt: torch.Tensor,
    steps: int,
    config: SqueezeConfig | QuantizedFullCache | None,
    forced: torch.Tensor | None = None,
) -> Decoded:
    """Prefills ``prompt`` (``[batch, P]``, no padding) then feeds ``steps - 1`` tokens one at a time.

    The fed tokens are ``forced`` (teacher forcing) or, without it, the greedy choice of each step.
    Scoring token by token is the decode path users get, so eviction during decode is measured too.
    """
    quantized = config if isinstance(config, QuantizedFullCache) else None
    with session_for(model, config, steps) as session:
        first = {} if quantized is None else {"cache": quantized.new_cache(model)}
        output = model(input_ids=prompt, use_cache=True, **first)
        cache, logits, tokens = output.cache, [output.logits[:, -1].float()], []
        for step in range(steps):
            token = forced[:, step] if forced is not None else logits[-1].argmax(-1)
            tokens.append(token)
            if step == steps - 1:
                break
            output = model(input_ids=token[:, None], cache=cache, use_cache=True)
            cache = output.cache
            logits.append(output.logits[:, -1].float())
        if session:
            held = session.cache.held_tokens().float().mean()
        else:
            held = quantized_cache_tokens(cache) if quantized else cache.get_seq_length()
    return Decoded(torch.stack(logits, 1), torch.stack(tokens, 1), float(held))


ENGINES = ("simple", "fast")


def pad_id(tokenizer) -> int:
    """What fills the left of a ragged batch: the pad token, else the end-of-sequence token, else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0


def left_padded(
    rows: list[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged token lists as one left-padded batch of ids and its attention mask."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for index, row in enumerate(rows):
        ids[index, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[index, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def greedy_generate(
    model: nn.Module,
    prompts: list[list[int]],
    new_tokens: int,
    config: SqueezeConfig | QuantizedFullCache | None,
    pad_id: int,
    engine: str = "simple",
    question_starts: list[int] | None = None,
    followups: list[list[int]] | None = None,
    stop_id: int | None = None,
) -> tuple[list[list[int]], float]:
    """Greedy continuations of ragged prompts (left padded), and the mean tokens held per layer.

    ``question_starts`` (each prompt's first question token) serve policies that observe the
    question; ``followups`` are token lists fed after the compressed prompt, a question asked after
    compression (the query-agnostic setting). ``engine="fast"`` generates compressed cells with
    :class:`~squeezekv.engine.FastGenerator` (static buffers, CUDA graphs on a GPU; tested to keep
    the tokens the simple path keeps). Answers may stop early once every one holds ``stop_id``:
    callers cut them there.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r} is not one of {', '.join(ENGINES)}")
    ids, mask = left_padded(prompts, pad_id, model.device)
    later = left_padded(followups, pad_id, model.device) if followups is not None else (None, None)
    questions = None if question_starts is None else torch.tensor(question_starts)
    if config is None or isinstance(config, QuantizedFullCache):
        sequences, held = full_cache_generate(model, ids, mask, later, new_tokens, pad_id, stop_id, config)
    elif engine == "fast":
        generator = FastGenerator(model, config, compile_layers=False)
        result = generator.generate(
            ids, mask, new_tokens, question_start=questions, followup_ids=later[0],
            followup_mask=later[1], stop_token_id=stop_id,
        )  # fmt: skip
        sequences, held = result.sequences, float(result.stats.layer_tokens_held.float().mean())
    else:
        sequences, held = stepwise_generate(model, config, ids, mask, questions, later, new_tokens, pad_id)
    return [row[ids.shape[1] :].tolist() for row in sequences], held


def full_cache_generate(
    model, ids, mask, later, new_tokens, pad_id, stop_id, quantized: QuantizedFullCache | None = None
) -> tuple[torch.Tensor, float]:
    """``model.generate`` on the model's own cache (or transformers' ``QuantizedCache``); a follow-up
    is appended to the prompt (a full cache keeps everything, so asking after the prompt is the same
    as asking in it). The KV held is in tokens, or in 16-bit tokens' bytes when quantized."""
    prompt_columns = ids.shape[1]
    if later[0] is not None:
        ids, mask = torch.cat([ids, later[0]], 1), torch.cat([mask, later[1]], 1)
    options = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id)
    if stop_id is not None:
        options["eos_token_id"] = stop_id
    if quantized is not None:
        options["cache"] = quantized.new_cache(model)
    sequences = model.generate(ids, attention_mask=mask, **options)
    if quantized is not None:
        held = quantized_cache_tokens(options["cache"])
    else:
        held = float(mask.sum(-1).float().mean()) + new_tokens - 1
    answers = sequences[:, ids.shape[1] :]
    return torch.cat([sequences[:, :prompt_columns], answers], 1), held


def stepwise_generate(
    model, config, ids, mask, questions, later, new_tokens, pad_id
) -> tuple[torch.Tensor, float]:
    """The simple path: ``model.generate`` under :func:`squeezekv.compress`, or, when the prompt
    needs :meth:`Session.prefill` (a question start, a follow-up, a policy that reconstructs), that
    prefill and then one plain forward per new token on the dynamic cache."""
    if questions is None and later[0] is None and not config.policy.reconstructs:
        options = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id)
        result = squeezekv.generate(model, ids, config, attention_mask=mask, **options)
        return result.sequences, float(result.stats.layer_tokens_held.float().mean())
    with squeezekv.compress(model, config, new_tokens) as session:
        output = session.prefill(ids, mask, question_start=questions)
        if later[0] is not None:
            output = session.extend(*later)
        tokens = [output.logits[:, -1].argmax(-1)]
        for _ in range(new_tokens - 1):
            output = session.extend(tokens[-1][:, None])
            tokens.append(output.logits[:, -1].argmax(-1))
        held = float(session.cache.held_tokens().float().mean())
    return torch.cat([ids, torch.stack(tokens, 1)], 1), held
