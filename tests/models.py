"""Tiny random-initialised models of every supported family, built from configs (no downloads)."""

from __future__ import annotations

import functools

import torch
from transformers import (
    FalconConfig,
    FalconForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

VOCAB = 96
COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, num_hidden_layers=6, num_attention_heads=4, max_position_embeddings=256
)
LLAMA_LIKE = dict(COMMON, intermediate_size=96, num_key_value_heads=2)

FAMILIES = {
    "llama": (LlamaForCausalLM, LlamaConfig, LLAMA_LIKE),
    "mistral": (MistralForCausalLM, MistralConfig, dict(LLAMA_LIKE, sliding_window=24)),
    "mixtral": (
        MixtralForCausalLM,
        MixtralConfig,
        dict(LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2),
    ),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config, LLAMA_LIKE),
    "qwen3": (Qwen3ForCausalLM, Qwen3Config, dict(LLAMA_LIKE, head_dim=16)),
    "phi3": (Phi3ForCausalLM, Phi3Config, dict(LLAMA_LIKE, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "gemma2": (Gemma2ForCausalLM, Gemma2Config, dict(LLAMA_LIKE, head_dim=16, sliding_window=24)),
    "gemma3": (Gemma3ForCausalLM, Gemma3TextConfig, dict(LLAMA_LIKE, head_dim=16, sliding_window=24)),
    "gpt_neox": (GPTNeoXForCausalLM, GPTNeoXConfig, dict(COMMON, intermediate_size=96)),
    "falcon": (FalconForCausalLM, FalconConfig, dict(COMMON, num_kv_heads=1, alibi=False)),
    "falcon_new": (
        FalconForCausalLM,
        FalconConfig,
        dict(COMMON, new_decoder_architecture=True, num_kv_heads=2, alibi=False),
    ),
    "opt": (
        OPTForCausalLM,
        OPTConfig,
        dict(
            vocab_size=VOCAB,
            hidden_size=64,
            ffn_dim=96,
            word_embed_proj_dim=64,
            num_hidden_layers=6,
            num_attention_heads=4,
            max_position_embeddings=256,
        ),
    ),
}
MQA = ("falcon",)  # one key/value head


def short_policy(name: str, window: int | None = None) -> str:
    """Policy ``name`` with settings that fit tiny prompts: 2 sinks and, if given, a ``window``-token
    observation window."""
    specs = {"streaming": "streaming:sinks=2"}
    if window:
        specs.update(snapkv=f"snapkv:window={window}", adakv=f"adakv:window={window}")
    return specs.get(name, name)


@functools.cache
def tiny_model(family: str, attn_implementation: str = "sdpa") -> torch.nn.Module:
    """A deterministic tiny model in float64, so that greedy ties cannot flip between paths."""
    model_class, config_class, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    config = config_class(**kwargs)
    config._attn_implementation = attn_implementation
    config._experts_implementation = "eager"  # the grouped kernel has no float64 path
    model = model_class(config).to(torch.float64).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None  # random weights: never stop early
    return model


def prompts(lengths: list[int], seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=generator) for n in lengths]


def left_pad(sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, s in enumerate(sequences):
        ids[row, width - len(s) :] = s
        mask[row, width - len(s) :] = 1
    return ids, mask
