import pytest
import torch
from transformers import FalconConfig, FalconForCausalLM, GPT2Config, GPT2LMHeadModel

import squeezekv
from squeezekv import SqueezeConfig

from models import tiny_model


def test_unsupported_model_names_the_supported_ones():
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50)).eval()
    with pytest.raises(ValueError, match=r"model type 'gpt2'; supported: falcon, gemma2, .*llama"):
        squeezekv.generate(
            model, torch.ones(1, 5, dtype=torch.long), SqueezeConfig(budget=0.5), max_new_tokens=2
        )


def test_unsupported_attention_implementation_is_refused():
    model = tiny_model("llama")
    model.config._attn_implementation = "flex_attention"
    try:
        with pytest.raises(ValueError, match="attn_implementation sdpa or eager, not 'flex_attention'"):
            squeezekv.generate(
                model, torch.ones(1, 5, dtype=torch.long), SqueezeConfig(budget=0.5), max_new_tokens=2
            )
    finally:
        model.config._attn_implementation = "sdpa"


def test_alibi_falcon_is_refused():
    config = FalconConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, alibi=True
    )
    with pytest.raises(ValueError, match="alibi"):
        squeezekv.compress(FalconForCausalLM(config), SqueezeConfig(budget=0.5)).__enter__()
