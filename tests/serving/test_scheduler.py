"""Continuous batching must give every request the tokens it gets alone, within its memory."""

import copy

import pytest
import torch

import squeezekv
from squeezekv import SqueezeConfig
from squeezekv.engine import FastGenerator
from squeezekv.ops import common, eviction, paged
from squeezekv.serving import QueueFull, Request, ServingEngine, batch
from squeezekv.serving.store import blocks_for

from models import prompts, short_policy, tiny_model

MiB = 2**20
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class Collector:
    """Each request's tokens and how it ended, as the engine reports them."""

    def __init__(self) -> None:
        self.tokens: dict[int, list[int]] = {}
        self.ends: dict[int, list[str]] = {}

    def listener(self, index: int):
        self.tokens[index], self.ends[index] = [], []

        def listen(kind, value):
            if kind == "token":
                self.tokens[index].append(value)
            else:
                self.ends[index].append(f"{kind}:{value}")

        return listen


def serve_staggered(engine, requests, arrivals):
    """Submits request ``i`` before step ``arrivals[i]`` and steps until every request has ended."""
    collector, step, pending = Collector(), 0, list(zip(arrivals, range(len(requests)), strict=True))
    built = []
    for index, (prompt, config, max_tokens, stops) in enumerate(requests):
        built.append(Request(prompt, max_tokens, config, collector.listener(index), frozenset(stops)))
    peak = 0
    while pending or any(not request.finished for request in built):
        for arrival, index in [item for item in pending if item[0] <= step]:
            engine.submit(built[index])
            pending.remove((arrival, index))
        engine.step()
        peak = max(peak, engine.kv_bytes_in_use)
        assert engine.kv_bytes_in_use <= engine.kv_memory
        step += 1
    return collector, peak


def alone(model, prompt, config, max_tokens):
    result = squeezekv.generate(
        model, torch.tensor([prompt]), config, max_new_tokens=max_tokens, do_sample=False
    )
    tokens = result.sequences[0, len(prompt) :].tolist()
    eos = model.generation_config.eos_token_id
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


def test_staggered_requests_equal_each_request_alone_on_the_reference_model(reference_model, heldout_prompts):
    _, model = reference_model
    config = SqueezeConfig(budget=0.25, policy="h2o", allocator="squeeze")
    stops = [model.generation_config.eos_token_id]
    requests = [(p, config, n, stops) for p, n in zip(heldout_prompts, [10, 14, 6, 12], strict=True)]
    engine = ServingEngine(model, config, kv_memory=8 * MiB)
    served, _ = serve_staggered(engine, requests, arrivals=[0, 1, 3, 8])
    for index, (prompt, _, max_tokens, _) in enumerate(requests):
        assert served.tokens[index] == alone(model, prompt, config, max_tokens), index
        assert len(served.ends[index]) == 1  # answered once
    assert engine.kv_bytes_in_use == 0 and not engine.running


def test_each_layer_of_a_batch_is_as_wide_as_its_own_widest_row(reference_model, heldout_prompts):
    """squeeze gives a few layers most of the prompt: the others' tables and bookkeeping stay narrow,
    so their decode pass walks only their own slots."""
    _, model = reference_model
    config = SqueezeConfig(budget=0.25, policy="h2o", allocator="squeeze")
    engine = ServingEngine(model, config, kv_memory=8 * MiB)
    collector = Collector()
    for index, prompt in enumerate(heldout_prompts[:2]):
        engine.submit(Request(prompt, 4, config, collector.listener(index), frozenset()))
    while engine.batch is None or engine.batch.rows < 2:
        engine.step()
    cache, block_size = engine.batch, engine.pool.block_size
    widths = [layer.tables.shape[1] for layer in cache.layers]
    for index, (layer, width) in enumerate(zip(cache.layers, widths, strict=True)):
        assert width == batch.bucket(max(len(row[index].blocks) for row in cache.slots))
        assert layer.positions.shape[-1] == layer.scores.shape[-1] == width * block_size
    assert len(set(widths)) > 1 and cache.key[1] == tuple(widths)


def test_keep_everything_budget_equals_model_generate(reference_model, heldout_prompts):
    _, model = reference_model
    config = SqueezeConfig(budget=1.0, policy="h2o")
    requests = [(p, config, 8, []) for p in heldout_prompts[1:]]
    served, _ = serve_staggered(
        ServingEngine(model, config, kv_memory=16 * MiB), requests, arrivals=[0, 2, 2]
    )
    for index, (prompt, *_rest) in enumerate(requests):
        expected = model.generate(
            torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None
        )
        assert served.tokens[index] == expected[0, len(prompt) :].tolist()


@pytest.mark.parametrize(
    ("family", "policy"),  # sliding windows (mistral, gemma3), grouped heads, every policy
    [("mistral", "window"), ("gemma3", "streaming"), ("gemma3", "h2o"), ("llama", "snapkv")],
)
def test_tiny_families_with_sliding_windows_and_mixed_budgets(family, policy):
    model = tiny_model(family)
    config = SqueezeConfig(budget=0.4, policy=short_policy(policy), allocator="squeeze")
    inputs = [p.tolist() for p in prompts([40, 22, 31], seed=4)]
    override = SqueezeConfig(budget=12, policy=config.policy, allocator="uniform")
    requests = [(inputs[0], config, 30, []), (inputs[1], override, 9, []), (inputs[2], config, 17, [])]
    served, _ = serve_staggered(
        ServingEngine(model, config, kv_memory=MiB, block_size=4), requests, [0, 2, 5]
    )
    for index, (prompt, request_config, max_tokens, _) in enumerate(requests):
        assert served.tokens[index] == alone(model, prompt, request_config, max_tokens), index


def test_a_row_costs_its_own_budgets_and_admission_waits_for_memory():
    model = tiny_model("llama")
    config = SqueezeConfig(budget=0.5, policy="h2o", allocator="squeeze")
    inputs = [p.tolist() for p in prompts([64, 60], seed=5)]
    engine = ServingEngine(model, config, kv_memory=MiB, block_size=4)  # resized below, to one request
    need = engine.blocks_needed(64, 8, config)
    engine = ServingEngine(model, config, kv_memory=need * engine.pool.bytes_per_block, block_size=4)
    collector = Collector()
    first = Request(inputs[0], 8, config, collector.listener(0))
    second = Request(inputs[1], 8, config, collector.listener(1))
    engine.submit(first)
    engine.submit(second)
    engine.step()  # the first is prefilled and decodes; the second cannot fit beside it
    budgets = engine.batch.budgets[0]
    row = engine.running[0]
    assert [len(layer.blocks) for layer in row.slots] == [blocks_for(b + 1, 4) for b in budgets.tolist()]
    assert (
        engine.kv_bytes_in_use == sum(len(layer.blocks) for layer in row.slots) * engine.pool.bytes_per_block
    )
    assert len(set(budgets.tolist())) > 1  # squeeze gave the layers different budgets
    assert list(engine.waiting) == [second]
    while not second.finished:
        engine.step()
        assert engine.in_flight <= 1  # the second is admitted only once the first has left
    assert collector.tokens[0] == alone(model, inputs[0], config, 8)
    assert collector.tokens[1] == alone(model, inputs[1], config, 8)


def test_queue_limit_oversized_requests_and_cancellation_free_memory():
    model = tiny_model("qwen2")
    config = SqueezeConfig(budget=0.5, policy="h2o")
    engine = ServingEngine(model, config, kv_memory=MiB // 4, max_waiting=2)
    inputs = [p.tolist() for p in prompts([30, 30, 30], seed=6)]
    collector = Collector()
    requests = [Request(p, 50, config, collector.listener(i)) for i, p in enumerate(inputs)]
    engine.submit(requests[0])
    engine.submit(requests[1])
    with pytest.raises(QueueFull, match="2 requests are waiting"):
        engine.submit(requests[2])
    with pytest.raises(ValueError, match="more than the server's whole kv_memory"):
        engine.submit(Request(inputs[0], 200, SqueezeConfig(budget=1.0), collector.listener(9)))
    with pytest.raises(ValueError, match="exceeds the model's maximum"):
        engine.submit(Request(inputs[0], 250, config, collector.listener(9)))
    for _ in range(3):
        engine.step()
    assert len(engine.running) == 2 and engine.kv_bytes_in_use > 0
    engine.cancel(requests[0])
    engine.step()
    assert [row.request for row in engine.running] == [requests[1]]
    engine.cancel(requests[1])
    engine.step()
    assert engine.kv_bytes_in_use == 0 and not engine.running
    assert collector.ends[0] == collector.ends[1] == ["finish:cancelled"]
    assert engine.finished["cancelled"] == 2


def test_chunked_prefill_interleaves_and_equals_the_fast_engines_chunked_prefill():
    model = tiny_model("llama")
    config = SqueezeConfig(budget=0.4, policy="h2o", allocator="squeeze")
    inputs = [p.tolist() for p in prompts([45, 37], seed=7)]
    engine = ServingEngine(model, config, kv_memory=MiB, prefill_chunk=8)
    served, first, second = Collector(), *(Request(p, 10, config, None) for p in inputs)
    first.listener, second.listener = served.listener(0), served.listener(1)
    engine.submit(first)
    while not engine.running:
        engine.step()
    engine.submit(second)
    for chunk in range(5):  # 37 tokens: 5 chunks of 8, a decode step of the first after each
        engine.step()
        assert engine.prefilling is not None or chunk == 4
        assert len(served.tokens[0]) == 3 + chunk
    while not second.finished:
        engine.step()
    for index, prompt in enumerate(inputs):
        fast = FastGenerator(model, config, cuda_graphs=False).generate(
            torch.tensor([prompt]), max_new_tokens=10, prefill_chunk=8
        )
        assert served.tokens[index] == fast.sequences[0, len(prompt) :].tolist()


@pytest.mark.skipif(common.triton is None, reason="needs Triton")
def test_the_decode_step_through_the_triton_kernels_equals_the_torch_path(monkeypatch):
    """What a GPU runs: the paged write, decode and eviction kernels (on the GPU, or else in Triton's
    interpreter) reading the pool through block tables, one column per row, a sliding window,
    against their torch twins on the same device."""
    model = copy.deepcopy(tiny_model("mistral")).float().to(DEVICE)
    config = SqueezeConfig(budget=0.4, policy="h2o", allocator="squeeze")  # scores, newest kept
    requests = [(p.tolist(), config, 3, []) for p in prompts([30, 21], seed=8)]
    monkeypatch.setattr(batch, "paged_decode_attention", paged.paged_decode_attention_torch)
    monkeypatch.setattr(batch, "write_paged_slot", paged.write_paged_slot_torch)
    monkeypatch.setattr(batch, "evict_lowest", eviction.evict_lowest_torch)
    expected, _ = serve_staggered(ServingEngine(model, config, kv_memory=MiB), requests, arrivals=[0, 1])

    def triton_decode(query, *arguments, with_mass, add_mass_to, **unused):
        return paged.paged_decode_attention_triton(query, *arguments, with_mass, add_mass_to)

    monkeypatch.setattr(batch, "paged_decode_attention", triton_decode)
    monkeypatch.setattr(batch, "write_paged_slot", paged.write_paged_slot_triton)
    monkeypatch.setattr(batch, "evict_lowest", eviction.evict_lowest_triton)
    served, _ = serve_staggered(ServingEngine(model, config, kv_memory=MiB), requests, arrivals=[0, 1])
    assert served.tokens == expected.tokens


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_captured_decode_steps_equal_eager_steps_on_the_gpu():
    """Buckets of 1, 2 and 4 rows (one a padding row), captured after their warm-up steps. A buffer
    that grows drops the graphs captured before it (on an H200 two were held at the end), so the
    test counts captures."""
    model = copy.deepcopy(tiny_model("mistral")).float().cuda()
    config = SqueezeConfig(budget=0.4, policy="h2o", allocator="squeeze")
    inputs = prompts([30, 21, 40], seed=9)
    requests = [(p.tolist(), config, n, []) for p, n in zip(inputs, [24, 16, 12], strict=True)]
    eager = ServingEngine(model, config, kv_memory=MiB)
    expected, _ = serve_staggered(eager, requests, arrivals=[0, 4, 8])
    engine = ServingEngine(model, config, kv_memory=MiB, cuda_graphs=True)
    served, _ = serve_staggered(engine, requests, arrivals=[0, 4, 8])
    assert served.tokens == expected.tokens
    assert eager.decode_steps.captured == 0 and engine.decode_steps.captured >= 2


@pytest.mark.parametrize(("policy", "reason"), [("adakv", "its own budget"), ("snapkv:window=0", "question")])
def test_policies_the_block_store_cannot_hold_are_refused_by_name(policy, reason):
    with pytest.raises(ValueError, match=rf"policy '{policy}' .*{reason}.*cannot serve it yet"):
        ServingEngine(tiny_model("llama"), SqueezeConfig(0.4, policy), kv_memory=MiB)
