"""Where each supported model family keeps its decoder layers, attention and residual stream."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from squeezekv.attention import squeezekv_attention


@dataclass(frozen=True)
class Architecture:
    """How to reach a family's pieces from the ``*ForCausalLM`` module.

    ``layers`` is the dotted path to the decoder layers, ``attention`` the attention module's name
    inside a layer. What the layer adds to its residual stream after attention is that module's
    output, or ``attention_output``'s (Gemma normalises the attention output first).
    ``attention_forward`` replaces the attention forward of families that do not dispatch
    through transformers' attention interface. ``compiled`` names the modules of a layer that the
    fast engine compiles for its captured decode step: norms and dense MLPs, chains of small
    pointwise kernels that compile into a few (a mixture of experts routes by data, so it stays out);
    ``compiled_functions`` names functions of the family's modeling module that its attention calls
    (the rotary embedding), compiled likewise. ``projections`` names the attention's linear layers
    that read its input (query, key, value), and ``gated_mlp`` says that the layer's ``mlp``
    computes ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``: the fast engine runs each as one
    matrix product (:mod:`squeezekv.fusion`).
    """

    layers: str
    attention: str = "self_attn"
    attention_output: str | None = None
    attention_forward: Callable | None = None
    compiled: tuple[str, ...] = ()
    compiled_functions: tuple[str, ...] = ()
    projections: tuple[str, ...] = ()
    gated_mlp: bool = False


def falcon_attention_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    alibi: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None = None,
    layer_past=None,
    use_cache: bool = False,
    output_attentions: bool = False,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Falcon's rotary attention, routed through squeezekv's attention."""
    from transformers.models.falcon.modeling_falcon import apply_rotary_pos_emb

    query, key, value = self._split_heads(self.query_key_value(hidden_states))
    batch, length = query.shape[:2]
    kv_heads = self.num_heads if self.new_decoder_architecture else self.num_kv_heads
    query = query.transpose(1, 2).reshape(batch, self.num_heads, length, self.head_dim)
    key = key.transpose(1, 2).reshape(batch, kv_heads, length, self.head_dim)
    value = value.transpose(1, 2).reshape(batch, kv_heads, length, self.head_dim)
    cos, sin = position_embeddings
    query, key = apply_rotary_pos_emb(query, key, cos, sin)
    key, value = layer_past.update(key, value, self.layer_idx)
    output, _ = squeezekv_attention(self, query, key, value, None, scaling=1 / math.sqrt(self.head_dim))
    return self.dense(output.reshape(batch, length, self.num_heads * self.head_dim)), None


_NORMS = ("input_layernorm", "post_attention_layernorm")
_ROTARY = ("apply_rotary_pos_emb",)
_QKV = ("q_proj", "k_proj", "v_proj")
_DECODER = Architecture(
    layers="model.layers",
    compiled=(*_NORMS, "mlp"),
    compiled_functions=_ROTARY,
    projections=_QKV,
    gated_mlp=True,
)
_GEMMA = Architecture(
    layers="model.layers",
    attention_output="post_attention_layernorm",
    compiled=(*_NORMS, "pre_feedforward_layernorm", "post_feedforward_layernorm", "mlp"),
    compiled_functions=_ROTARY,
    projections=_QKV,
    gated_mlp=True,
)
ARCHITECTURES: dict[str, Architecture] = {
    "llama": _DECODER,
    "mistral": _DECODER,
    "mixtral": Architecture(
        layers="model.layers", compiled=_NORMS, compiled_functions=_ROTARY, projections=_QKV
    ),
    "qwen2": _DECODER,
    "qwen3": _DECODER,
    "phi3": Architecture(  # its checkpoints hold query, key, value and gate, up as one weight each
        layers="model.layers", compiled=(*_NORMS, "mlp"), compiled_functions=_ROTARY
    ),
    "gemma2": _GEMMA,
    "gemma3_text": _GEMMA,
    "gpt_neox": Architecture(layers="gpt_neox.layers", attention="attention", compiled_functions=_ROTARY),
    "falcon": Architecture(
        layers="transformer.h",
        attention="self_attention",
        attention_forward=falcon_attention_forward,
        compiled_functions=_ROTARY,
    ),
    "opt": Architecture(layers="model.decoder.layers"),
}


def architecture_of(model: nn.Module) -> Architecture:
    """The model's family, or a ``ValueError`` naming the supported ones."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"squeezekv does not support model type {model_type!r}; "
            f"supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    if model_type == "falcon" and getattr(config, "alibi", False):
        raise ValueError("squeezekv supports rotary Falcon models only, not ones with alibi=True")
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError("squeezekv supports decoder-only models only")
    return ARCHITECTURES[model_type]


def decoder_layers(model: nn.Module, architecture: Architecture) -> list[nn.Module]:
    module = model
    for name in architecture.layers.split("."):
        module = getattr(module, name)
    return list(module)


def sliding_window_of(model: nn.Module, attention: nn.Module) -> int | None:
    """The window a layer attends within, or ``None`` for full attention."""
    if hasattr(attention, "sliding_window"):
        return attention.sliding_window
    if model.config.model_type in ("mistral", "mixtral", "phi3"):
        return getattr(model.config, "sliding_window", None)
    return None
