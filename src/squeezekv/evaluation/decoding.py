"""Running a model on the full cache or on a squeezekv cache, the same way for both.

``config=None`` means the model's own full cache; otherwise every forward runs inside
``squeezekv.compress``, so a compressed prompt keeps evicting while later tokens are fed in.
"""

from __future__ import annotations

import contextlib
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


def session_for(model: nn.Module, config: SqueezeConfig | None, new_tokens: int):
    return contextlib.nullcontext() if config is None else squeezekv.compress(model, config, new_tokens)


@torch.inference_mode()
def decode(
    model: nn.Module,
    prompt: torch.Tensor,
    steps: int,
    config: SqueezeConfig | None,
    forced: torch.Tensor | None = None,
) -> Decoded:
    """Prefills ``prompt`` (``[batch, P]``, no padding) then feeds ``steps - 1`` tokens one at a time.

    The fed tokens are ``forced`` (teacher forcing) or, without it, the greedy choice of each step.
    Scoring token by token is the decode path users get, so eviction during decode is measured too.
    """
    with session_for(model, config, steps) as session:
        output = model(input_ids=prompt, use_cache=True)
        cache, logits, tokens = output.cache, [output.logits[:, -1].float()], []
        for step in range(steps):
            token = forced[:, step] if forced is not None else logits[-1].argmax(-1)
            tokens.append(token)
            if step == steps - 1:
                break
            output = model(input_ids=token[:, None], cache=cache, use_cache=True)
            cache = output.cache
            logits.append(output.logits[:, -1].float())
        held = session.cache.held_tokens().float().mean() if session else cache.get_seq_length()
    return Decoded(torch.stack(logits, 1), torch.stack(tokens, 1), float(held))


ENGINES = ("simple", "fast")


def pad_id(tokenizer) -> int:
    """What fills the left of a ragged batch: the pad token, else the end-of-sequence token, else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0


@torch.inference_mode()
def greedy_generate(
    model: nn.Module,
    prompts: list[list[int]],
    new_tokens: int,
    config: SqueezeConfig | None,
    pad_id: int,
    engine: str = "simple",
) -> tuple[list[list[int]], float]:
    """Greedy continuations of ragged prompts (left padded), and the mean tokens held per layer.

    ``engine="fast"`` generates compressed cells with :class:`~squeezekv.engine.FastGenerator`
    (static buffers, CUDA graphs on a GPU; tested to keep the tokens the simple path keeps), always
    ``new_tokens`` of them: callers cut answers at the end-of-sequence token either way.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r} is not one of {', '.join(ENGINES)}")
    width = max(len(prompt) for prompt in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    ids, mask = ids.to(model.device), mask.to(model.device)
    options = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id)
    if config is None:
        sequences = model.generate(ids, attention_mask=mask, **options)
        held = sum(len(prompt) for prompt in prompts) / len(prompts) + new_tokens - 1
    else:
        if engine == "fast":
            generator = FastGenerator(model, config, compile_layers=False)
            result = generator.generate(ids, mask, max_new_tokens=new_tokens)
        else:
            result = squeezekv.generate(model, ids, config, attention_mask=mask, **options)
        sequences, held = result.sequences, float(result.stats.layer_tokens_held.float().mean())
    return [row[width:].tolist() for row in sequences], held
