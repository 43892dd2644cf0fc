"""On a GPU, the captured CUDA-graph decode keeps what the simple path keeps (skipped without one)."""

import pytest
import torch

import squeezekv
from squeezekv import SqueezeConfig
from squeezekv.engine import FastGenerator

from models import left_pad, prompts, short_policy, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("policy", sorted(squeezekv.POLICIES))
def test_graphed_decode_equals_simple_path_on_the_gpu(policy):
    model = tiny_model("llama", "eager").to("cuda")  # float64: slot order cannot flip a greedy tie
    ids, mask = left_pad(prompts([60, 41, 52], seed=7))
    ids, mask = ids.cuda(), mask.cuda()
    config = SqueezeConfig(budget=0.3, policy=short_policy(policy, window=8), allocator="squeeze")
    try:
        simple = squeezekv.generate(
            model, ids, config, attention_mask=mask, max_new_tokens=24, do_sample=False
        )
        generator = FastGenerator(model, config)
        fast = generator.generate(ids, mask, max_new_tokens=24, prefill_batch=2)
    finally:
        model.to("cpu")
    assert torch.equal(simple.sequences, fast.sequences)
    assert torch.equal(simple.stats.layer_tokens_held, fast.stats.layer_tokens_held)
    assert generator.steady_step_seconds is not None


def test_h2o_decode_equals_simple_path_with_three_query_heads_per_key_head():
    """SmolLM2's grouping (9 query heads over 3 key-value heads): the decode kernel pads a group to
    a power of 2, and its padding once made the attention mass NaN, which only h2o reads at decode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from models import LLAMA_LIKE

    torch.manual_seed(0)
    config = LlamaConfig(**dict(LLAMA_LIKE, hidden_size=96, num_attention_heads=6))
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config).to(torch.float64).eval().to("cuda")
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, None
    ids, mask = left_pad(prompts([60, 41, 52], seed=7))
    ids, mask = ids.cuda(), mask.cuda()
    config = SqueezeConfig(budget=0.3, policy="h2o", allocator="squeeze")
    simple = squeezekv.generate(model, ids, config, attention_mask=mask, max_new_tokens=24, do_sample=False)
    fast = FastGenerator(model, config).generate(ids, mask, max_new_tokens=24)
    assert torch.equal(simple.sequences, fast.sequences)
    assert torch.equal(simple.stats.layer_tokens_held, fast.stats.layer_tokens_held)


@pytest.mark.parametrize(("bits", "policy"), [(8, "h2o"), (4, "window"), (4, "snapkv")])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_graphed_decode_over_packed_codes_equals_simple_path_on_the_gpu(bits, policy, dtype):
    """Residual windows quantized on the host between graph replays; in float32 both paths read the
    codes through the Triton kernel, in float64 (eager attention) through its torch twin."""
    model = tiny_model("llama", "eager" if dtype == torch.float64 else "sdpa").to("cuda", dtype)
    ids, mask = left_pad(prompts([60, 41, 52], seed=7))
    ids, mask = ids.cuda(), mask.cuda()
    config = SqueezeConfig(0.5, short_policy(policy, window=8), "squeeze", kv_bits=bits)
    try:
        simple = squeezekv.generate(
            model, ids, config, attention_mask=mask, max_new_tokens=150, do_sample=False
        )
        generator = FastGenerator(model, config)
        fast = generator.generate(ids, mask, max_new_tokens=150, prefill_batch=2)
    finally:
        model.to("cpu", torch.float64)
    assert torch.equal(simple.sequences, fast.sequences)
    assert torch.equal(simple.stats.layer_tokens_held, fast.stats.layer_tokens_held)
    assert generator.cache.layers[0].packed.start == 60 + 2 * 64
