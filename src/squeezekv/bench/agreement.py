"""Whether the fast engine, as benchmarked, keeps the simple path's tokens on the bench's device."""

from __future__ import annotations

import torch

from squeezekv.bench.shapes import build_model
from squeezekv.config import SqueezeConfig
from squeezekv.engine import FastGenerator

NEW_TOKENS = 90  # past a packed cache's first residual window (64 columns)


def agreement(
    device: torch.device,
    policies: tuple[str, ...],
    cuda_graphs: bool,
    compile_layers: bool,
    kv_bits: tuple[int, ...] = (16,),
) -> dict[str, dict]:
    """Whether the fast engine, decoding as benchmarked (CUDA graphs or not, compiled layers or
    not), keeps the simple path's tokens and outputs on this device: keep-everything and every
    benchmarked policy, at every benchmarked precision.

    Checked on the ``tiny`` shape in float64 (random weights; greedy ties cannot flip between
    paths), with a ragged, left-padded batch prefilled in two micro-batches.
    """
    from squeezekv.generation import generate

    model = build_model("tiny", "cpu", 64 + NEW_TOKENS).to(device, torch.float64)
    generator = torch.Generator().manual_seed(0)
    lengths = (60, 41, 52)
    ids = torch.randint(3, model.config.vocab_size, (len(lengths), max(lengths)), generator=generator)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        mask[row, -length:] = 1
    ids, mask = (ids * mask).to(device), mask.to(device)
    checks = {"keep-all": SqueezeConfig(budget=1.0, policy="window", allocator="uniform")}
    for policy in policies:
        short = {"streaming": "streaming:sinks=2", "snapkv": "snapkv:window=8", "adakv": "adakv:window=8"}
        short = short.get(policy, policy)
        for bits in kv_bits:
            name = policy if bits == 16 else f"{policy} {bits}-bit"
            checks[name] = SqueezeConfig(budget=0.3, policy=short, kv_bits=bits)
    results = {}
    for name, config in checks.items():
        simple = generate(model, ids, config, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
        graphs = cuda_graphs and device.type == "cuda"
        fast = FastGenerator(model, config, graphs, compile_layers).generate(
            ids, mask, max_new_tokens=NEW_TOKENS, prefill_batch=2
        )
        results[name] = {
            "tokens_equal": torch.equal(simple.sequences, fast.sequences),
            "kept_equal": torch.equal(simple.stats.layer_tokens_held, fast.stats.layer_tokens_held),
        }
    return results
