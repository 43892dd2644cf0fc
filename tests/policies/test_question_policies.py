"""Policies that keep what a question needs: spans (chunkkv), the question as the observation window
(snapkv:window=0) and scores from reconstructing the prompt (reconstruct)."""

import pytest
import torch

import squeezekv
from squeezekv import SqueezeConfig
from squeezekv.engine import FastGenerator
from squeezekv.policies import LayerView, resolve_policy, select
from squeezekv.policies.chunk import ChunkKV

from models import left_pad, prompts, tiny_model


def test_chunkkv_keeps_whole_spans():
    scores = torch.tensor([0, 0, 0, 5, 0, 0, 1, 1, 1, 0, 0, 0], dtype=torch.float32).view(1, 1, -1)
    positions = torch.arange(12).view(1, 1, -1)
    view = LayerView(
        positions, torch.ones_like(scores, dtype=torch.bool), scores, "prefill", 12, torch.tensor([0])
    )
    policy = ChunkKV(window=1, chunk=3)  # chunks 0-2, 3-5, 6-8, 9-11; the last column is the window
    chosen, kept = select(policy.ranking(view, torch.tensor([7])), view.valid, torch.tensor([7]))
    assert chosen[0, 0][kept[0, 0]].tolist() == [3, 4, 5, 6, 7, 8, 11]  # the 5's span and the 1s' span whole
    with pytest.raises(ValueError, match="chunk=0 must be an integer >= 1"):
        ChunkKV(chunk=0)


@pytest.mark.parametrize("spec", ["snapkv:heads=shared", "chunkkv:heads=shared"])
def test_shared_heads_keep_the_same_tokens_in_every_head_of_a_layer(spec):
    model = tiny_model("llama")
    ids, mask = left_pad(prompts([40, 33], seed=3))
    with squeezekv.compress(model, SqueezeConfig(0.3, spec, "uniform")) as session:
        session.prefill(ids, mask)
        for layer in session.cache.layers:
            kept = torch.where(layer.valid.expand_as(layer.positions), layer.positions, -1).sort(-1).values
            assert layer.positions.shape[1] > 1 and bool((kept == kept[:, :1]).all())
    own = FastGenerator(model, SqueezeConfig(0.3, spec.split(":")[0])).generate(ids, mask, 8)
    shared = FastGenerator(model, SqueezeConfig(0.3, spec)).generate(ids, mask, 8)
    assert torch.equal(own.stats.layer_tokens_held, shared.stats.layer_tokens_held)  # same memory
    with pytest.raises(ValueError, match="heads='all' must be 'own' or 'shared'"):
        resolve_policy("snapkv:heads=all")


def test_snapkv_observing_the_question_is_snapkv_with_the_question_as_its_window():
    model = tiny_model("llama")
    ids, mask = left_pad(prompts([40, 33], seed=3))
    window = 6
    starts = mask.sum(-1) - window  # the last six tokens of each prompt are its "question"
    tail = FastGenerator(model, SqueezeConfig(0.3, f"snapkv:window={window}")).generate(ids, mask, 8)
    question = FastGenerator(model, SqueezeConfig(0.3, "snapkv:window=0")).generate(
        ids, mask, 8, question_start=starts
    )
    assert torch.equal(tail.sequences, question.sequences)
    assert torch.equal(tail.stats.layer_tokens_held, question.stats.layer_tokens_held)
    with pytest.raises(ValueError, match="observes the question, but the prompt did not say where it starts"):
        FastGenerator(model, SqueezeConfig(0.3, "snapkv:window=0")).generate(ids, mask, 8)
    bad = pytest.raises(ValueError, match=r"question_start \[40, 0\] must give")
    with bad, squeezekv.compress(model, SqueezeConfig(0.3, "snapkv:window=0")) as session:
        session.prefill(ids, mask, question_start=torch.tensor([40, 0]))


def test_reconstruct_scores_the_prompt_by_a_second_pass_it_then_forgets():
    model = tiny_model("llama")
    ids, mask = left_pad(prompts([36, 29], seed=4))
    config = SqueezeConfig(100, "reconstruct", "uniform")  # nothing evicted: the cache shows the scores
    with squeezekv.compress(model, config) as session:
        session.prefill(ids, mask)
        layer = session.cache.layers[0]
        assert layer.seen == ids.shape[1] and layer.keys.shape[2] == ids.shape[1]  # the repeat is gone
        real = layer.valid[0, 0]
        assert bool((layer.scores[0, :, real] > 0).all())  # every real token was looked at by the repeat
        with pytest.raises(ValueError, match="cannot prefill in chunks"):
            session.prefill(ids, mask, chunk_tokens=8)
    assert resolve_policy("reconstruct").reconstructs


def test_reconstruct_scores_by_the_peak_and_keeps_its_window_and_chunks():
    model = tiny_model("llama")
    ids, mask = left_pad(prompts([36, 29], seed=4))
    scores = {}
    for score in ("sum", "max"):
        with squeezekv.compress(
            model, SqueezeConfig(100, f"reconstruct:score={score}", "uniform")
        ) as session:
            session.prefill(ids, mask)
            layer = session.cache.layers[0]
            scores[score] = layer.scores[layer.valid.expand_as(layer.scores)]
    assert bool((scores["max"] > 0).all() & (scores["max"] <= 1).all())  # one probability per key
    assert bool((scores["max"] <= scores["sum"] + 1e-6).all()) and not torch.allclose(
        scores["max"], scores["sum"]
    )
    with squeezekv.compress(model, SqueezeConfig(0.3, "reconstruct:window=5,chunk=4", "uniform")) as session:
        session.prefill(ids, mask)
        for layer in session.cache.layers:
            kept = {int(p) for p in layer.positions[0, 0][layer.valid[0, 0]]}
            assert set(range(ids.shape[1] - 5, ids.shape[1])) <= kept  # the prompt's last tokens stay
    with pytest.raises(ValueError, match="score='mean' must be 'max' or 'sum'"):
        resolve_policy("reconstruct:score=mean")
