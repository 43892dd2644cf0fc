import importlib.util

import pytest
import torch

from squeezekv import SqueezeConfig
from squeezekv.evaluation.decoding import QuantizedFullCache, decode, greedy_generate


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


def test_the_quantized_full_cache_is_transformers_own(reference):
    """The peer cell runs ``model.generate`` on transformers' QuantizedCache, as a user would, and
    reports its bytes in 16-bit tokens: 4-bit codes plus a 2-byte scale and shift per head-size
    group (0.3 of a 16-bit token at head size 40), the newest tokens (the residual) at 16 bits."""
    from transformers.cache_utils import QuantizedCache

    tokenizer, model = reference
    prompts = [tokenizer("The river ran past the old mill and").input_ids * 20]
    answers, held = greedy_generate(model, prompts, 6, QuantizedFullCache(4), tokenizer.eos_token_id)
    cache = QuantizedCache(backend="quanto", config=model.config, nbits=4, q_group_size=40)
    ids = torch.tensor(prompts)
    want = model.generate(
        ids, max_new_tokens=6, do_sample=False, cache=cache, pad_token_id=tokenizer.eos_token_id
    )
    assert answers == [want[0, ids.shape[1] :].tolist()]
    assert held == pytest.approx(0.3 * len(prompts[0]) + 5)  # the prompt quantized, 5 new tokens waiting
    decoded = decode(model, ids, 3, QuantizedFullCache(2))
    assert decoded.kv_tokens == pytest.approx(0.175 * len(prompts[0]) + 2)


def test_the_quantized_full_cache_names_what_it_needs(reference, monkeypatch):
    with pytest.raises(ValueError, match="stores 2 or 4 bits, not 8"):
        QuantizedFullCache(8)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if "quanto" in name else real_find_spec(name)
    )
    with pytest.raises(ValueError, match=r'optimum-quanto package: pip install "squeezekv\[quanto\]"'):
        QuantizedFullCache(4).new_cache(reference[1])
