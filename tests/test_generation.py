import pytest
import torch

import squeezekv
from squeezekv import SqueezeConfig
from squeezekv.allocators.precision import PrecisionAllocator

from models import FAMILIES, left_pad, prompts, short_policy, tiny_model

POLICY_NAMES = sorted(squeezekv.POLICIES)
# a precision allocator quantizes the cache on purpose (tests/cache/test_quantized.py); oracle needs
# a measured profile (tests/allocators/test_oracle.py)
ALLOCATOR_NAMES = sorted(
    name
    for name, cls in squeezekv.ALLOCATORS.items()
    if not issubclass(cls, PrecisionAllocator) and name != "oracle"
)
NEW_TOKENS = 8


def implementations(family):
    return ["eager"] if family == "gemma2" else ["sdpa", "eager"]  # transformers has no SDPA Gemma-2


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_keep_everything_budget_is_token_identical_to_plain_generate(family):
    for implementation in implementations(family):
        model = tiny_model(family, implementation)
        ids = prompts([30])[0][None]
        expected = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        for policy in POLICY_NAMES:
            for allocator in ALLOCATOR_NAMES:
                if (
                    squeezekv.ALLOCATORS[allocator].reads_dispersion
                    and not squeezekv.POLICIES[policy]().scores_tokens
                ):
                    continue  # refused when configured (tests/allocators/test_cake.py)
                config = SqueezeConfig(budget=200, policy=policy, allocator=allocator)
                result = squeezekv.generate(model, ids, config, max_new_tokens=NEW_TOKENS, do_sample=False)
                assert torch.equal(result.sequences, expected), (implementation, policy, allocator)
                assert result.stats.kv_bytes_kept == result.stats.kv_bytes_full or family in (
                    "mistral",
                    "gemma2",
                    "gemma3",
                )


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma3", "falcon", "gpt_neox", "opt", "qwen3"])
@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_batch_equals_one_by_one(family, policy):
    model = tiny_model(family)
    sequences = prompts([34, 21, 28], seed=1)
    ids, mask = left_pad(sequences)
    config = SqueezeConfig(budget=0.4, policy=short_policy(policy), allocator="squeeze")
    batched = squeezekv.generate(
        model, ids, config, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False
    )
    for row, sequence in enumerate(sequences):
        alone = squeezekv.generate(model, sequence[None], config, max_new_tokens=NEW_TOKENS, do_sample=False)
        assert torch.equal(alone.sequences[0, len(sequence) :], batched.sequences[row, ids.shape[1] :])
        assert torch.equal(alone.stats.layer_budget[0], batched.stats.layer_budget[row])
        assert torch.equal(alone.stats.layer_tokens_held[0], batched.stats.layer_tokens_held[row])
        torch.testing.assert_close(alone.stats.layer_similarity[0], batched.stats.layer_similarity[row])


def test_stats_report_budgets_and_memory():
    model = tiny_model("llama")
    ids = prompts([40])[0][None]
    config = SqueezeConfig(budget=0.25, policy="h2o", allocator="squeeze")
    result = squeezekv.generate(model, ids, config, max_new_tokens=NEW_TOKENS, do_sample=False)
    stats = result.stats
    assert stats.layer_similarity.shape == stats.layer_budget.shape == (1, 6)
    assert int(stats.layer_budget.sum()) == 6 * 10
    assert torch.equal(stats.layer_tokens_held, stats.layer_budget)
    assert stats.kv_bytes_kept < stats.kv_bytes_full
    assert stats.decode_steps == NEW_TOKENS - 1 and stats.prefill_seconds > 0
    assert set(stats.to_dict()) >= {"layer_similarity", "layer_budget", "kv_bytes_full", "kv_bytes_kept"}


def test_model_generate_inside_the_context_manager_and_hooks_removed_after():
    model = tiny_model("qwen2")
    ids = prompts([36])[0][None]
    plain = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    config = SqueezeConfig(budget=0.3, policy="window", allocator="uniform")
    with squeezekv.compress(model, config) as session:
        compressed = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        assert session.cache.held_tokens().tolist() == [[10] * 6]
        again = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)  # a fresh cache each call
    assert torch.equal(compressed, again)
    assert model.config._attn_implementation == "sdpa"
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert torch.equal(model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False), plain)


def test_hooks_are_removed_when_generation_fails():
    model = tiny_model("llama")
    with (
        pytest.raises(ValueError, match="use_cache=False"),
        squeezekv.compress(model, SqueezeConfig(budget=0.5)),
    ):
        model(prompts([10])[0][None], use_cache=False)
    assert model.config._attn_implementation == "sdpa" and not model._forward_pre_hooks


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        (torch.zeros(1, 0, dtype=torch.long), "empty prompt"),
        (torch.ones(1, 300, dtype=torch.long), "exceeds the model's maximum of 256"),
    ],
)
def test_bad_prompts_are_rejected(ids, message):
    with pytest.raises(ValueError, match=message):
        squeezekv.generate(tiny_model("llama"), ids, SqueezeConfig(budget=0.5), max_new_tokens=4)


def test_prompt_plus_new_tokens_beyond_the_maximum_is_rejected():
    with pytest.raises(ValueError, match=r"250 tokens \+ 10 new tokens"):
        squeezekv.generate(
            tiny_model("llama"), torch.ones(1, 250, dtype=torch.long), SqueezeConfig(0.5), max_new_tokens=10
        )


def test_fraction_too_small_for_the_prompt_is_rejected_before_running():
    config = SqueezeConfig(budget=0.05, policy="streaming")
    with pytest.raises(ValueError, match="too small for policy 'streaming'"):
        squeezekv.generate(tiny_model("llama"), prompts([40])[0][None], config, max_new_tokens=4)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_budget_of_one_keeps_everything_and_is_model_generate(family):
    """1.0 keeps the prompt and every new token, in every family, whatever the policy, even when the
    session is not told how many tokens will follow."""
    model = tiny_model(family, implementations(family)[0])
    lengths = [30] if family == "gemma2" else [30, 19]  # plain eager Gemma-2 emits pad tokens on padded rows
    ids, mask = left_pad(prompts(lengths, seed=6))
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    for policy in ("h2o", "snapkv", "streaming"):
        config = SqueezeConfig(budget=1.0, policy=policy)
        result = squeezekv.generate(
            model, ids, config, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False
        )
        assert torch.equal(result.sequences, expected), policy
        with squeezekv.compress(model, config) as session:  # max_new_tokens unknown
            untold = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
            held = session.cache.held_tokens()
        assert torch.equal(untold, expected), policy
        if model.config.get_text_config().to_dict().get("sliding_window") is None:
            assert result.stats.kv_bytes_kept == result.stats.kv_bytes_full
            everything = mask.sum(-1, keepdim=True) + NEW_TOKENS - 1  # the last token is never cached
            assert torch.equal(held, everything.expand_as(held))
