"""The fast engine must keep exactly what the simple path keeps and produce the same tokens."""

import sys

import pytest
import torch
from paths import assert_same_tokens_kept, simple_and_fast

import squeezekv
from squeezekv import SqueezeConfig
from squeezekv.engine import FastGenerator, compiled_parts, kv_bytes_per_sequence
from squeezekv.evaluation.decoding import stepwise_generate
from squeezekv.ops.quantize import KEY_GROUP_TOKENS

from models import FAMILIES, left_pad, prompts, short_policy, tiny_model

NEW_TOKENS = 12
# policies whose heads keep the same number of tokens (head-wise ones are packed: tests/cache/test_ragged.py)
UNIFORM_HEADS = sorted(n for n, c in squeezekv.POLICIES.items() if not c().spreads_over_heads)


@pytest.mark.parametrize("family", ["llama", "mistral", "falcon", "gemma3", "gpt_neox", "opt"])
@pytest.mark.parametrize("policy", UNIFORM_HEADS)
def test_fast_engine_equals_simple_path(family, policy):
    model = tiny_model(family)
    ids, mask = left_pad(prompts([40, 25, 33], seed=1))
    config = SqueezeConfig(budget=0.3, policy=short_policy(policy, window=4), allocator="squeeze")
    simple, simple_cache, generator, fast = simple_and_fast(model, config, ids, mask, NEW_TOKENS)
    assert torch.equal(simple, fast.sequences)
    for dynamic, static in zip(simple_cache.layers, generator.cache.layers, strict=True):
        assert_same_tokens_kept(dynamic, static, rows=3, heads=static.keys.shape[1])
        assert static.keys.shape[2] == int(static.budget.max()) + 1  # the budget plus one free slot
    assert fast.stats.kv_bytes_kept == generator.cache.kv_bytes_kept() < fast.stats.kv_bytes_full


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])
def test_fast_engine_at_a_keep_everything_budget_matches_model_generate(family):
    model = tiny_model(family)
    ids, mask = left_pad(prompts([30, 22], seed=2))
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    for policy in sorted(squeezekv.POLICIES):
        fast = FastGenerator(model, SqueezeConfig(budget=100, policy=policy)).generate(ids, mask, NEW_TOKENS)
        assert torch.equal(fast.sequences, expected), policy


def test_micro_batched_prefill_changes_nothing():
    model = tiny_model("qwen3")
    ids, mask = left_pad(prompts([35, 20, 28, 31], seed=3))
    config = SqueezeConfig(budget=0.25, policy="h2o")
    whole = FastGenerator(model, config).generate(ids, mask, NEW_TOKENS)
    one_by_one = FastGenerator(model, config).generate(ids, mask, NEW_TOKENS, prefill_batch=1)
    assert torch.equal(whole.sequences, one_by_one.sequences)
    assert torch.equal(whole.stats.layer_budget, one_by_one.stats.layer_budget)


def test_chunked_prefill_at_a_keep_everything_budget_matches_model_generate():
    model = tiny_model("llama")
    ids, mask = left_pad(prompts([40, 27], seed=4))
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    config = SqueezeConfig(budget=100, policy="h2o")
    whole = FastGenerator(model, config).generate(ids, mask, NEW_TOKENS)
    chunked = FastGenerator(model, config).generate(ids, mask, NEW_TOKENS, prefill_chunk=7)
    assert torch.equal(chunked.sequences, expected)
    torch.testing.assert_close(chunked.stats.layer_similarity, whole.stats.layer_similarity)


@pytest.mark.parametrize("policy", [p for p in UNIFORM_HEADS if not squeezekv.POLICIES[p].reconstructs])
def test_chunked_prefill_holds_at_most_budget_plus_one_chunk(policy):
    model = tiny_model("qwen2")
    ids, mask = left_pad(prompts([48, 37], seed=5))
    config = SqueezeConfig(budget=0.25, policy=short_policy(policy, window=4))
    widest, planned = [], []

    def widths(*_):
        return max(layer.keys.shape[2] for layer in session.cache.layers)

    with squeezekv.compress(model, config) as session:
        during = model.model.layers[-1].register_forward_hook(lambda *_: widest.append(widths()))
        after = model.register_forward_hook(lambda *_: planned.append(int(session.cache.budgets.max())))
        try:
            session.prefill(ids, mask, chunk_tokens=8)
        finally:
            during.remove()
            after.remove()
        cache = session.cache
        assert torch.equal(cache.budgets.sum(-1), 6 * (mask.sum(-1) // 4))  # planned for the whole prompt
        assert (cache.held_tokens() <= cache.budgets).all()
    assert len(widest) == len(planned) == 6
    assert all(width <= budget + 8 for width, budget in zip(widest[1:], planned, strict=False))
    assert max(widest) < ids.shape[1]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_compiled_parts_share_one_graph_per_kind_and_give_the_model_back(family):
    model = tiny_model(family, "eager")
    architecture = squeezekv.architectures.architecture_of(model)
    modeling = sys.modules[type(model).__module__]
    functions = {name: getattr(modeling, name) for name in architecture.compiled_functions}
    layers = squeezekv.architectures.decoder_layers(model, architecture)
    kinds = {type(getattr(layer, name)) for layer in layers for name in architecture.compiled}
    graphs = []

    def counting(graph_module, inputs):
        graphs.append(graph_module)
        return graph_module.forward

    ids = torch.stack(prompts([9, 9, 9], seed=3))
    with torch.inference_mode():
        plain = model(ids).logits
        with compiled_parts(model, architecture, backend=counting):
            assert all(getattr(modeling, name) is not f for name, f in functions.items())
            compiled = model(ids).logits
        assert all(getattr(modeling, name) is f for name, f in functions.items())
        assert all("forward" not in module.__dict__ for module in model.modules())
        after = model(ids).logits
    assert len(graphs) == len(kinds) + len(functions)  # e.g. Llama: norms, MLPs, rotary embeddings
    assert torch.equal(plain, compiled) and torch.equal(plain, after)


@pytest.mark.parametrize("family", ["llama", "mistral", "falcon", "gemma3", "gpt_neox", "opt", "phi3"])
def test_fast_engine_at_a_budget_of_one_is_model_generate(family):
    model = tiny_model(family)
    ids, mask = left_pad(prompts([33, 21], seed=8))
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    for policy in ("h2o", "snapkv", "streaming"):
        generator = FastGenerator(model, SqueezeConfig(budget=1.0, policy=policy))
        fast = generator.generate(ids, mask, NEW_TOKENS, prefill_batch=1)
        assert torch.equal(fast.sequences, expected), policy
        if family not in ("mistral", "gemma3"):  # sliding layers drop what they can no longer see
            held = mask.sum(-1, keepdim=True) + NEW_TOKENS - 1
            assert torch.equal(fast.stats.layer_tokens_held, held.expand(-1, 6))


@pytest.mark.parametrize("policy", ["h2o", "snapkv", "reconstruct"])
def test_a_follow_up_after_compression_is_the_same_on_both_paths(policy):
    model = tiny_model("llama")
    ids, mask = left_pad(prompts([40, 25, 33], seed=8))
    later, later_mask = left_pad(prompts([5, 3, 7], seed=9))
    for bits in (16, 4):  # packed: the follow-up waits in the residual window the decode then fills
        config = SqueezeConfig(budget=0.3, policy=short_policy(policy, window=4), kv_bits=bits)
        new_tokens = NEW_TOKENS if bits == 16 else KEY_GROUP_TOKENS
        simple, _ = stepwise_generate(
            model, config, ids, mask, None, (later, later_mask), new_tokens, pad_id=0
        )
        fast = FastGenerator(model, config).generate(
            ids, mask, new_tokens, followup_ids=later, followup_mask=later_mask
        )
        assert torch.equal(fast.sequences[:, ids.shape[1] :], simple[:, ids.shape[1] :]), bits


def test_decoding_stops_once_every_sequence_has_the_stop_token():
    model = tiny_model("llama")
    ids, mask = left_pad(prompts([30, 22], seed=2))
    config = SqueezeConfig(budget=0.5, policy="window")
    whole = FastGenerator(model, config).generate(ids, mask, 40)
    stop = int(whole.sequences[0, ids.shape[1] + 3])  # a token both rows produce early, if any
    early = FastGenerator(model, config).generate(ids, mask, 40, stop_token_id=stop)
    new_whole, new_early = whole.sequences[:, ids.shape[1] :], early.sequences[:, ids.shape[1] :]
    for row in range(2):
        found = (new_whole[row] == stop).nonzero()
        cut = int(found[0]) + 1 if len(found) else 40
        assert torch.equal(new_early[row, :cut], new_whole[row, :cut])  # the same answer up to the stop
    if all((new_whole[row] == stop).any() for row in range(2)):
        assert early.stats.decode_steps < 39 and bool((new_early[:, -1] == stop).all())


@pytest.mark.parametrize(
    ("policy", "bits", "group"),
    [(policy, 4, KEY_GROUP_TOKENS) for policy in UNIFORM_HEADS]
    + [("h2o", 8, KEY_GROUP_TOKENS), ("window", 8, KEY_GROUP_TOKENS), ("h2o", 8, 16)],
)
def test_fast_engine_with_packed_keys_and_values_equals_simple_path(policy, bits, group):
    """Past two residual windows, each quantized on the host between steps, with the micro-batches'
    key-group tables stacked: the same tokens kept, the same new tokens."""
    model = tiny_model("llama")
    ids, mask = left_pad(prompts([100, 85, 93], seed=1))
    config = SqueezeConfig(0.5, short_policy(policy, window=4), "squeeze", kv_bits=bits, kv_group=group)
    new_tokens = 2 * group + 12
    simple, simple_cache, generator, fast = simple_and_fast(model, config, ids, mask, new_tokens)
    assert torch.equal(simple, fast.sequences)
    for dynamic, static in zip(simple_cache.layers, generator.cache.layers, strict=True):
        assert static.keys is None and static.packed.bits == bits
        assert_same_tokens_kept(dynamic, static, rows=3, heads=static.packed.heads)
        assert static.packed.start == dynamic.packed.residual_start == 100 + 2 * group
        assert static.packed.residual_keys.shape[2] == group
    assert fast.stats.kv_bytes_kept == generator.cache.kv_bytes_kept()


@pytest.mark.parametrize(
    ("bits", "group"), [(16, KEY_GROUP_TOKENS), (8, KEY_GROUP_TOKENS), (4, KEY_GROUP_TOKENS), (8, 16)]
)
def test_bytes_per_sequence_are_what_the_fast_engine_allocates(bits, group):
    """The bench sizes its batches from this, before any run."""
    model = tiny_model("llama")
    ids = prompts([90, 90], seed=3)
    config = SqueezeConfig(30, "h2o", "uniform", kv_bits=bits, kv_group=group)
    generator = FastGenerator(model, config)
    generator.generate(torch.stack(ids), max_new_tokens=70, prefill_batch=1)
    expected = 2 * kv_bytes_per_sequence(model, config, 90, 70)
    assert generator.cache.kv_bytes_kept() == expected
    assert (generator.cache.row_overhead_bytes() > 0) == (bits < 16)
