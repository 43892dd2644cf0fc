import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import squeezekv
from squeezekv import SqueezeConfig

from models import LLAMA_LIKE, prompts, tiny_model


def test_nested_compress_on_the_same_model_says_a_session_is_active():
    model = tiny_model("llama")
    with squeezekv.compress(model, SqueezeConfig(budget=0.5)):
        with (
            pytest.raises(ValueError, match="session is already active on this model; exit it"),
            squeezekv.compress(model, SqueezeConfig(budget=0.3)),
        ):
            pass
        model(prompts([10])[0][None])  # the outer session still works
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("allocator", ["uniform", "squeeze", "squeeze:groups=5", "pyramid"])
def test_a_model_with_fewer_layers_than_groups_is_compressed(allocator):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**dict(LLAMA_LIKE, num_hidden_layers=2))).eval()
    config = SqueezeConfig(budget=0.5, allocator=allocator)
    result = squeezekv.generate(model, prompts([30])[0][None], config, max_new_tokens=3, do_sample=False)
    assert int(result.stats.layer_budget.sum()) == 2 * 15


def test_a_head_wise_policy_is_refused_under_tensor_parallelism(monkeypatch):
    monkeypatch.setattr(squeezekv.session, "tensor_parallel_group", lambda model: object())
    config = SqueezeConfig(budget=0.3, policy="adakv")
    with (
        pytest.raises(ValueError, match="adakv spreads a layer's budget"),
        squeezekv.compress(tiny_model("llama"), config),
    ):
        pass
