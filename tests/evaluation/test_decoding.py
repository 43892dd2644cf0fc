import pytest

from squeezekv import SqueezeConfig
from squeezekv.evaluation.decoding import greedy_generate


@pytest.mark.parametrize("policy", ["window", "h2o", "snapkv"])
def test_the_fast_engine_answers_as_the_simple_path(reference, policy):
    tokenizer, model = reference
    prompts = [
        tokenizer(text).input_ids for text in ("The river ran past the old mill and", "Alice said that")
    ]
    prompts = [prompt * 8 for prompt in prompts]  # ragged, long enough to compress
    config = SqueezeConfig(budget=0.4, policy=policy, allocator="squeeze")
    simple, held_simple = greedy_generate(model, prompts, 12, config, tokenizer.eos_token_id, "simple")
    fast, held_fast = greedy_generate(model, prompts, 12, config, tokenizer.eos_token_id, "fast")
    assert [row[: len(a)] for row, a in zip(fast, simple, strict=True)] == simple
    assert held_fast == pytest.approx(held_simple)


def test_an_unknown_engine_is_named(reference):
    tokenizer, model = reference
    with pytest.raises(ValueError, match="engine 'turbo' is not one of simple, fast"):
        greedy_generate(model, [[1, 2, 3]], 2, SqueezeConfig(budget=1.0), 0, "turbo")
