"""Packed layers for head-wise budgets: heads hold their own budgets while decoding, the memory is
the sum of the heads' budgets, and the fast engine keeps exactly what the simple path keeps."""

import pytest
import torch
from paths import assert_same_tokens_kept, kept_positions, simple_and_fast

import squeezekv
from squeezekv import SqueezeConfig
from squeezekv.cache.ragged import RaggedLayer, RaggedStaticLayer
from squeezekv.engine import FastGenerator

from models import left_pad, prompts, tiny_model

NEW_TOKENS = 10
CONFIG = SqueezeConfig(budget=0.3, policy="adakv:window=4", allocator="squeeze")


def test_heads_hold_their_own_budgets_while_decoding():
    model = tiny_model("llama")
    ids, mask = left_pad(prompts([40, 29]))
    with squeezekv.compress(model, CONFIG) as session:
        output = model(ids, attention_mask=mask)
        cache = session.cache
        packed = [layer for layer in cache.layers if isinstance(layer, RaggedLayer)]
        for layer, budget in zip(cache.layers, cache.budgets.T, strict=True):
            if isinstance(layer, RaggedLayer):  # two key heads: twice the layer's budget in all
                assert torch.equal(layer.head_budgets.sum(-1), 2 * budget)
        assert packed
        fixed = [layer.head_budgets.clone() for layer in packed]
        for _ in range(4):
            token = output.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(token)], dim=-1)
            output = model(token, attention_mask=mask, cache=output.cache)
            for layer, budgets in zip(packed, fixed, strict=True):
                assert torch.equal(layer.lengths, budgets)  # full heads stay full, none grows
                assert layer.keys.shape == (int(budgets.sum()), 16)  # at rest: packed, nothing padded
        assert (cache.held_tokens() <= cache.budgets).all()


def test_a_batch_keeps_per_head_what_each_sequence_keeps_alone():
    model = tiny_model("llama")
    sequences = prompts([34, 21, 28], seed=1)
    ids, mask = left_pad(sequences)

    def generate(ids, mask):
        with squeezekv.compress(model, CONFIG, max_new_tokens=NEW_TOKENS) as session:
            output = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
        return output, session.cache

    batched, cache = generate(ids, mask)
    assert any(isinstance(layer, RaggedLayer) for layer in cache.layers)
    for row, sequence in enumerate(sequences):
        alone, own = generate(sequence[None], None)
        assert torch.equal(alone[0, len(sequence) :], batched[row, ids.shape[1] :])
        padding = ids.shape[1] - len(sequence)
        for together, single in zip(cache.layers, own.layers, strict=True):
            for head in range(2):
                shifted = [position + padding for position in kept_positions(single, 0, head)]
                assert kept_positions(together, row, head) == shifted


@pytest.mark.parametrize("family", ["llama", "mistral", "gpt_neox"])  # GQA; sliding windows; MHA
def test_fast_engine_keeps_what_the_simple_path_keeps_per_head(family):
    model = tiny_model(family)
    heads = 2 if family != "gpt_neox" else 4
    ids, mask = left_pad(prompts([40, 25, 33], seed=1))
    simple, simple_cache, generator, fast = simple_and_fast(model, CONFIG, ids, mask, NEW_TOKENS)
    assert torch.equal(simple, fast.sequences)
    assert any(isinstance(layer, RaggedStaticLayer) for layer in generator.cache.layers)
    for dynamic, static in zip(simple_cache.layers, generator.cache.layers, strict=True):
        assert_same_tokens_kept(dynamic, static, rows=3, heads=heads)
        if isinstance(static, RaggedStaticLayer):  # each head: its budget plus one free slot, packed
            slots = int((static.head_budgets + 1).sum())
            assert static.keys.shape == static.values.shape == (slots, 16)
            padded = 2 * 3 * heads * (int(static.head_budgets.max()) + 1) * 16 * 8
            assert static.keys.nbytes + static.values.nbytes < padded
    assert torch.equal(fast.stats.layer_tokens_held, simple_cache.held_tokens())
    assert fast.stats.kv_bytes_kept == generator.cache.kv_bytes_kept() < fast.stats.kv_bytes_full


def test_a_keep_everything_budget_reproduces_model_generate():
    model = tiny_model("llama")
    ids, mask = left_pad(prompts([30, 22], seed=2))
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    config = SqueezeConfig(budget=1.0, policy="adakv:window=4")
    simple = squeezekv.generate(
        model, ids, config, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False
    )
    fast = FastGenerator(model, config).generate(ids, mask, NEW_TOKENS, prefill_batch=1)
    assert torch.equal(simple.sequences, expected) and torch.equal(fast.sequences, expected)


def test_chunked_prefill_holds_at_most_the_heads_budgets_plus_one_chunk():
    model = tiny_model("qwen2")
    ids, mask = left_pad(prompts([48, 37], seed=5))
    held, planned = [], []

    def tokens_per_head(*_) -> None:
        packed = [layer for layer in session.cache.layers if isinstance(layer, RaggedLayer)]
        if packed:
            held.append((len(planned), max(layer.keys.shape[0] / layer.lengths.numel() for layer in packed)))

    with squeezekv.compress(model, CONFIG) as session:
        during = model.model.layers[-1].register_forward_hook(tokens_per_head)
        after = model.register_forward_hook(lambda *_: planned.append(int(session.cache.budgets.max())))
        try:
            session.prefill(ids, mask, chunk_tokens=8)
        finally:
            during.remove()
            after.remove()
        layers, budgets = session.cache.layers, session.cache.budgets
    assert held and all(tokens <= planned[chunk - 1] + 8 for chunk, tokens in held)  # the previous plan
    for layer, budget in zip(layers, budgets.T, strict=True):
        if isinstance(layer, RaggedLayer):  # the last chunk's spread, which decoding keeps
            assert torch.equal(layer.head_budgets.sum(-1), 2 * budget)
            assert torch.equal(layer.lengths, layer.head_budgets)
