import torch
from transformers import CompileConfig
from transformers.integrations import sdpa_attention

from squeezekv.bench.gqa import packed_gqa_under_compile
from squeezekv.bench.shapes import build_model


def compiled_static_generate(model, ids):
    """Static-cache greedy decoding compiled by a backend that keeps the traced graphs; returns the
    tokens and how many ``expand`` calls (``repeat_kv``'s copies of the key-value heads) they hold."""
    graphs = []

    def backend(graph, inputs, **_):
        graphs.append(graph)
        return graph.forward

    compile_config = CompileConfig(backend=backend)
    compile_config._compile_all_devices = True  # transformers compiles on GPUs only, unless told
    tokens = model.generate(
        ids, max_new_tokens=6, do_sample=False, cache_implementation="static", max_cache_len=26,
        compile_config=compile_config,
    )  # fmt: skip
    assert graphs, "the decode was not compiled"
    return tokens, sum(node.target == "expand" for graph in graphs for node in graph.graph.nodes)


def test_packed_gqa_decodes_the_stock_tokens_without_repeating_heads_and_is_restored():
    model = build_model("tiny", "cpu", 64)  # 4 query heads over 2 key-value heads
    ids = torch.randint(3, 512, (2, 20), generator=torch.Generator().manual_seed(0))
    stock = model.generate(ids, max_new_tokens=6, do_sample=False)
    original = sdpa_attention.is_torchdynamo_compiling
    with packed_gqa_under_compile():
        packed, packed_expands = compiled_static_generate(model, ids)
    assert sdpa_attention.is_torchdynamo_compiling is original
    torch._dynamo.reset()
    repeated, repeated_expands = compiled_static_generate(model, ids)
    torch._dynamo.reset()
    assert torch.equal(packed, stock) and torch.equal(repeated, stock)
    assert packed_expands == 0 < repeated_expands  # restored: the stock compiled decode repeats again


def test_the_patch_is_undone_when_the_block_fails():
    original = sdpa_attention.is_torchdynamo_compiling
    try:
        with packed_gqa_under_compile():
            assert not sdpa_attention.is_torchdynamo_compiling()
            raise KeyError("boom")
    except KeyError:
        pass
    assert sdpa_attention.is_torchdynamo_compiling is original
