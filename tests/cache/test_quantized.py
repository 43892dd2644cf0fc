import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import squeezekv
from squeezekv import SqueezeConfig
from squeezekv.engine import FastGenerator
from squeezekv.ops.quantize import KEY_GROUP_TOKENS, token_bytes
from squeezekv.reference import load_heldout, reference_model_path
from squeezekv.serving.scheduler import ServingEngine

from models import left_pad, prompts, tiny_model

HEADS, DIM = 2, 16  # the tiny llama's key-value heads and head size


def test_kv_bits_16_is_the_unquantized_cache_of_before():
    model = tiny_model("llama")
    ids = prompts([40])[0][None]
    plain = squeezekv.generate(model, ids, SqueezeConfig(0.3, "h2o"), max_new_tokens=6, do_sample=False)
    config = SqueezeConfig(0.3, "h2o", kv_bits=16, equal_bytes=True)
    with squeezekv.compress(model, config, max_new_tokens=6) as session:
        sixteen = model.generate(ids, max_new_tokens=6, do_sample=False)
        assert session.cache.layer_bits is None
        assert all(layer.packed is None and layer.keys is not None for layer in session.cache.layers)
        assert session.cache.kv_bytes_kept() == plain.stats.kv_bytes_kept
    assert torch.equal(sixteen, plain.sequences)
    assert config.to_dict() == SqueezeConfig(0.3, "h2o").to_dict()


@pytest.mark.parametrize("bits", [8, 4])
def test_kv_bytes_kept_are_the_packed_bytes_scales_included(bits):
    model = tiny_model("llama")
    with squeezekv.compress(model, SqueezeConfig(1.0, "h2o", "uniform", kv_bits=bits)) as session:
        model(prompts([50])[0][None])
    cache = session.cache
    slots = 50  # one key group of 50 tokens per head, the residual window empty
    codes = 2 * HEADS * slots * DIM * bits // 8
    value_scales = HEADS * slots * 1 * 2 * 2  # one group of 16 channels: a float16 scale and zero
    key_scales = HEADS * 1 * DIM * 2 * 2  # per channel of the one group
    group_starts = HEADS * 1 * 4
    assert cache.kv_bytes_kept() == 6 * (codes + value_scales + key_scales + group_starts)
    assert cache.kv_bytes_full() == 6 * 2 * HEADS * slots * DIM * 8  # float64, as before
    packed = cache.layers[0].packed.parts[0]
    assert packed.key_codes.dtype == torch.uint8 and packed.key_codes.shape == (1, HEADS, 50, DIM * bits // 8)


def teacher_forced_logits(model, ids, forced):
    output, logits = model(ids, use_cache=True), []
    for token in [None, *forced[:-1]]:
        if token is not None:
            output = model(token.view(1, 1), cache=output.cache, use_cache=True)
        logits.append(output.logits[0, -1])
    return torch.stack(logits)


def test_keep_everything_at_8_bits_stays_close_to_the_full_cache():
    """Teacher-forced on the full cache's greedy tokens, past the residual window's first flush."""
    model = tiny_model("llama")
    ids = prompts([40])[0][None]
    steps = KEY_GROUP_TOKENS + 2
    greedy = model.generate(ids, max_new_tokens=steps, do_sample=False)[0, 40:]
    expected = teacher_forced_logits(model, ids, greedy)
    with squeezekv.compress(model, SqueezeConfig(1.0, "h2o", kv_bits=8), max_new_tokens=steps) as session:
        got = teacher_forced_logits(model, ids, greedy)
        assert session.cache.layers[0].packed.residual_start > 40  # the window was quantized once
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    assert (got - expected).abs().max() < 0.02 * expected.std()


def test_reference_model_at_8_bits_keeps_model_generate_tokens():
    path = reference_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tokenizer(load_heldout("short")[0]["text"][:800], return_tensors="pt").input_ids
    expected = model.generate(ids, max_new_tokens=12, do_sample=False)
    result = squeezekv.generate(model, ids, SqueezeConfig(1.0, "h2o", kv_bits=8), max_new_tokens=12)
    assert torch.equal(result.sequences, expected)
    # float32 to 8-bit codes and float16 scales is 27 %; the 12 new tokens wait unquantized
    assert result.stats.kv_bytes_kept < 0.33 * result.stats.kv_bytes_full


def quantized_slots(cache) -> list[dict]:
    """Per layer: ``(row, head, column)`` -> the dequantized key and value of every valid slot that
    holds codes (not the residual window)."""
    found = []
    for layer in cache.layers:
        keys, values = layer.states()
        columns = layer.positions.expand(-1, keys.shape[1], -1)
        coded = layer.valid.expand_as(columns) & (columns < layer.packed.residual_start)
        found.append(
            {
                (b, h, int(columns[b, h, s])): (keys[b, h, s], values[b, h, s])
                for b, h, s in coded.nonzero().tolist()
            }
        )
    return found


def test_eviction_moves_codes_and_never_quantizes_a_kept_token_again():
    model = tiny_model("llama")
    ids, mask = left_pad(prompts([40, 27], seed=3))
    config = SqueezeConfig(12, "h2o", "uniform", kv_bits=4)
    seen: list[dict] = [{} for _ in range(6)]
    evicted = flushed = 0
    with squeezekv.compress(model, config, max_new_tokens=70) as session:
        output = model(ids, attention_mask=mask)
        for _ in range(70):
            now = quantized_slots(session.cache)
            for before, after in zip(seen, now, strict=True):
                for slot, (key, value) in after.items():
                    if slot in before:
                        assert torch.equal(before[slot][0], key) and torch.equal(before[slot][1], value)
                evicted += len(before.keys() - after.keys())
                flushed += len(after.keys() - before.keys())
            seen = now
            token = output.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(token)], dim=-1)
            output = model(token, attention_mask=mask, cache=output.cache)
        assert (session.cache.held_tokens() <= 12).all()
    assert evicted > 0 and flushed > 2 * 6 * 12  # codes left, and the residual window was quantized


@pytest.mark.parametrize("bad", [12, 1, 3.5, "8"])
def test_bad_kv_bits_are_refused_naming_the_value(bad):
    with pytest.raises(ValueError, match=rf"kv_bits={bad!r} is not supported; choose one of 16, 8, 4"):
        SqueezeConfig(0.2, kv_bits=bad)


def test_what_quantized_caches_do_not_support_is_refused():
    with pytest.raises(ValueError, match="policy 'adakv' gives each head its own budget.*kv_bits=8"):
        SqueezeConfig(0.2, "adakv", kv_bits=8)
    with pytest.raises(ValueError, match="kv_bits=8 with allocator 'squeeze-bits'.*leave kv_bits at 16"):
        SqueezeConfig(0.2, allocator="squeeze-bits", kv_bits=8)
    with pytest.raises(ValueError, match="fast engine.*allocator 'squeeze-bits'.*simple path"):
        FastGenerator(tiny_model("llama"), SqueezeConfig(0.2, allocator="squeeze-bits"), cuda_graphs=False)
    with pytest.raises(ValueError, match="kv_bits=8 .*only the simple path stores: the server cannot serve"):
        ServingEngine(tiny_model("llama"), SqueezeConfig(0.2, kv_bits=8), kv_memory=2**20)


def test_equal_bytes_budgets_buy_more_tokens_at_fewer_bits_and_never_more_bytes():
    """Once the residual window is paid for (at 16 bits), fewer bits buy more tokens; a cache at
    equal bytes never holds more bytes than the 16-bit one, whenever its window fills."""
    model = tiny_model("llama")
    ids = prompts([200])[0][None]
    held, kept = {}, {}
    for bits in (16, 8, 4):
        for new_tokens in (1, 30, 55):
            config = SqueezeConfig(100, "h2o", "uniform", kv_bits=bits, equal_bytes=True)
            with squeezekv.compress(model, config, max_new_tokens=new_tokens) as session:
                model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
            held[bits] = session.cache.budgets
            kept[bits, new_tokens] = session.cache.kv_bytes_kept()
    for bits in (8, 4):
        ratio = token_bytes(16, DIM, DIM) / token_bytes(bits, DIM, DIM)
        assert (held[bits] == int((100 - (KEY_GROUP_TOKENS - 1)) * ratio)).all()
        for new_tokens in (1, 30, 55):
            assert kept[bits, new_tokens] <= kept[16, new_tokens]
    assert (held[4] > held[16]).all()  # at this budget 8 bits buy fewer: the window costs most of it
    config = SqueezeConfig(60, "window", "uniform", kv_bits=4, equal_bytes=True)
    refused = pytest.raises(ValueError, match="budget of 60 16-bit tokens per layer cannot hold kv_bits=4")
    with refused, squeezekv.compress(model, config):
        model(ids)


@pytest.mark.parametrize("bits", [8, 4])
def test_a_smaller_key_group_holds_a_budget_its_window_would_take_at_64(bits):
    """60 16-bit tokens cannot pay for a window of 63 columns, but can for one of 15: the layer
    keeps more tokens than 16 bits do, flushes its window every 16 columns, and never holds more
    bytes than the 16-bit cache."""
    model = tiny_model("llama")
    ids = prompts([200])[0][None]
    kept, held = {}, {}
    for stored in (16, bits):
        config = SqueezeConfig(60, "h2o", "uniform", kv_bits=stored, equal_bytes=True, kv_group=16)
        with squeezekv.compress(model, config, max_new_tokens=40) as session:
            model.generate(ids, max_new_tokens=40, do_sample=False)
        kept[stored], held[stored] = session.cache.kv_bytes_kept(), session.cache.budgets
    assert kept[bits] <= kept[16]
    assert (held[bits] == int(45 * token_bytes(16, DIM, DIM) / token_bytes(bits, DIM, DIM, 16))).all()
    assert (held[bits] > held[16]).all()
    layer = session.cache.layers[0]
    assert layer.packed.residual_start == 200 + 32 and layer.packed.group_tokens == 16


def unviewed_bytes(holders) -> list[tuple[str, int]]:
    """Per storage behind a tensor attribute of ``holders``, its attributes' names and the bytes of it
    that none of them views: a view that keeps more alive than it shows. Layers ranked together at
    an eviction may share one storage for their bookkeeping, each viewing its own part."""
    by_storage: dict[int, list[tuple[str, torch.Tensor]]] = {}
    for index, holder in enumerate(holders):
        for name, value in vars(holder).items():
            if isinstance(value, torch.Tensor) and value.numel():
                key = value.untyped_storage().data_ptr()
                by_storage.setdefault(key, []).append((f"{index}: {type(holder).__name__}.{name}", value))
    unviewed = []
    for tensors in by_storage.values():
        views = {(value.data_ptr(), value.numel() * value.element_size()) for _, value in tensors}
        spare = tensors[0][1].untyped_storage().nbytes() - sum(size for _, size in views)
        unviewed.append((", ".join(name for name, _ in tensors), spare))
    return unviewed


@pytest.mark.parametrize("bits", [16, 8])
@pytest.mark.parametrize("new_tokens", [1, KEY_GROUP_TOKENS + 5])
def test_a_compressed_layer_keeps_no_other_storage_alive(bits, new_tokens):
    """Its bytes are the bytes it reports: an empty residual window sliced from the prompt's keys
    once kept the whole full-precision layer allocated behind the codes."""
    model = tiny_model("llama")
    config = SqueezeConfig(0.3, "h2o", kv_bits=bits)
    with squeezekv.compress(model, config, max_new_tokens=new_tokens) as session:
        model.generate(prompts([120])[0][None], max_new_tokens=new_tokens, do_sample=False)
    holders = list(session.cache.layers)
    if bits < 16:
        holders += [part for layer in session.cache.layers for part in (layer.packed, *layer.packed.parts)]
    unviewed = unviewed_bytes(holders)
    assert unviewed and all(spare == 0 for _, spare in unviewed), [part for part in unviewed if part[1]]
