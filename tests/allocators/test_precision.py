import pytest
import torch

import squeezekv
from squeezekv import SqueezeConfig
from squeezekv.allocators import resolve_allocator
from squeezekv.ops.quantize import KEY_GROUP_TOKENS, token_bytes

from models import left_pad, prompts, tiny_model


@pytest.mark.parametrize("p", [1.0, 0.5])
def test_precision_plan_spends_at_most_its_bytes(p):
    allocator = resolve_allocator(f"squeeze-bits:p={p}")
    generator = torch.Generator().manual_seed(1)
    for _ in range(20):
        similarity = torch.rand(16, generator=generator, dtype=torch.float64)
        caps = torch.randint(30, 2000, (16,), generator=generator)
        tokens = allocator.plan_tokens(similarity, 200, 4, caps, (40, 40))
        bits = allocator.layer_bits(similarity)
        window = (KEY_GROUP_TOKENS - 1) * token_bytes(16, 40, 40)  # each quantized layer's, unquantized
        spent = sum(
            t * token_bytes(int(b), 40, 40) + window * (b < 16)
            for t, b in zip(tokens.tolist(), bits, strict=True)
        )
        assert spent <= 16 * 200 * token_bytes(16, 40, 40) + 1e-6
        assert (tokens <= caps).all() and (tokens >= torch.minimum(torch.tensor(4), caps)).all()
        squeezed = allocator.squeezed_layers(similarity)
        assert (bits[squeezed] == 4).all() and (bits[~squeezed] == 8).all()
        if p == 1.0 and bool((caps >= 1000).all()):  # uncapped: equal bytes, so more tokens at 4 bits
            assert tokens[squeezed].min() > tokens[~squeezed].max()


def test_a_byte_budget_its_windows_would_take_is_refused():
    allocator = resolve_allocator("squeeze-bits")
    similarity = torch.linspace(0.5, 1.0, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="budget of 50 16-bit tokens per layer cannot hold kv_bits=4"):
        allocator.plan_tokens(similarity, 50, 4, torch.full((16,), 400), (40, 40))


def test_precision_allocator_plans_each_sequence_as_if_alone():
    model = tiny_model("llama")
    sequences = prompts([180, 140], seed=4)  # budgets that pay for the 4-bit layers' residual windows
    ids, mask = left_pad(sequences)
    config = SqueezeConfig(0.8, "h2o", "squeeze-bits:low_bits=4,high_bits=16")
    batched = squeezekv.generate(model, ids, config, attention_mask=mask, max_new_tokens=6, do_sample=False)
    for row, sequence in enumerate(sequences):
        alone = squeezekv.generate(model, sequence[None], config, max_new_tokens=6, do_sample=False)
        assert torch.equal(alone.sequences[0, len(sequence) :], batched.sequences[row, ids.shape[1] :])
        assert torch.equal(alone.stats.layer_budget[0], batched.stats.layer_budget[row])
