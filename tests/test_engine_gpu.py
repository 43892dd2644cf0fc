"""On a GPU, the captured CUDA-graph decode keeps what the simple path keeps (skipped without one)."""

import pytest
import torch

import squeezekv
from squeezekv import SqueezeConfig
from squeezekv.engine import FastGenerator

from models import left_pad, prompts, short_policy, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# every policy unquantized; packed codes in float64 (eager attention: the kernel's torch twin) and in
# float32 (the Triton kernel), past two residual windows quantized on the host between graph replays
# (key groups of 64; and h2o at 8 bits in groups of 16, so that nine windows are quantized)
CASES = (
    [(policy, 16, torch.float64, 64) for policy in sorted(squeezekv.POLICIES)]
    + [
        (policy, bits, dtype, 64)
        for policy, bits in (("h2o", 8), ("window", 4), ("snapkv", 4))
        for dtype in (torch.float64, torch.float32)
    ]
    + [("h2o", 8, torch.float32, 16)]
)


@pytest.mark.parametrize(("policy", "bits", "dtype", "group"), CASES)
def test_graphed_decode_equals_simple_path_on_the_gpu(policy, bits, dtype, group):
    """float64 where slot order must not flip a greedy tie between the paths."""
    model = tiny_model("llama", "eager" if dtype == torch.float64 else "sdpa").to("cuda", dtype)
    ids, mask = left_pad(prompts([60, 41, 52], seed=7))
    ids, mask = ids.cuda(), mask.cuda()
    budget, new_tokens = (0.3, 24) if bits == 16 else (0.5, 150)
    config = SqueezeConfig(budget, short_policy(policy, window=8), "squeeze", kv_bits=bits, kv_group=group)
    try:
        simple = squeezekv.generate(
            model, ids, config, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False
        )
        generator = FastGenerator(model, config)
        fast = generator.generate(ids, mask, max_new_tokens=new_tokens, prefill_batch=2)
    finally:
        model.to("cpu", torch.float64)
    assert torch.equal(simple.sequences, fast.sequences)
    assert torch.equal(simple.stats.layer_tokens_held, fast.stats.layer_tokens_held)
    assert generator.steady_step_seconds is not None
    if bits < 16:
        assert generator.cache.layers[0].packed.start == 60 + (new_tokens - 1) // group * group


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
