"""Where squeezekv's prefill overhead goes: plain forward vs the compressed prefill, on one GPU.

For a random-weight model of a bench shape and one prompt, prints:

- one layer's prefill attention alone: SDPA's causal kernel (the plain forward's) against
  :func:`~squeezekv.ops.prefill_attention` scoring every query (median of CUDA-event timings);
- each policy's prefill overhead as ``squeezekv bench`` measures it (plain and compressed
  forwards alternating, median of ``--rounds``);
- the GPU time of each path's kernels, and the kernels and host calls whose totals differ most
  from the plain forward's, so that the cost of importance, planning and eviction can be told
  apart from time the GPU spends waiting for the host.

    python benchmarks/prefill_profile.py --shape llama2-7b --prompt-tokens 8192 --policies window,h2o
"""

from __future__ import annotations

import argparse
import statistics
from collections import Counter

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from squeezekv.bench.orchestrate import prefill_overhead
from squeezekv.bench.shapes import build_model
from squeezekv.config import SqueezeConfig
from squeezekv.ops import prefill_attention
from squeezekv.session import compress


def event_median_ms(run, rounds: int) -> float:
    """Median of ``rounds`` CUDA-event timings of ``run``, after two warm-up calls."""
    for _ in range(2):
        run()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def attention_ms(model, tokens: int, rounds: int) -> tuple[float, float]:
    """One layer's prefill attention on random bf16 inputs of the model's head shape: SDPA's causal
    forward, and ``prefill_attention`` with every query scored."""
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    query = torch.randn(1, heads, tokens, dim, device="cuda", dtype=torch.bfloat16)
    key, value = (
        torch.randn(1, kv_heads, tokens, dim, device="cuda", dtype=torch.bfloat16) for _ in range(2)
    )
    positions = torch.arange(tokens, device="cuda").view(1, 1, tokens)
    valid = torch.ones(1, 1, tokens, dtype=torch.bool, device="cuda")
    args = (query, key, value, positions, valid, 0, None, dim**-0.5, tokens, valid[:, 0])
    sdpa = event_median_ms(
        lambda: F.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=dim**-0.5, enable_gqa=heads != kv_heads
        ),
        rounds,
    )
    return sdpa, event_median_ms(lambda: prefill_attention(*args), rounds)


def totals(run) -> tuple[Counter, Counter, Counter]:
    """Per-name device time (µs) and call counts of kernels, and host time (µs) of CUDA runtime calls."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as trace:
        run()
        torch.cuda.synchronize()
    device, calls, host = Counter(), Counter(), Counter()
    for event in trace.key_averages():
        if event.self_device_time_total > 0:
            device[event.key] += event.self_device_time_total
            calls[event.key] += event.count
        if event.key.startswith("cuda") and not event.key.startswith("cudaLaunch"):
            host[f"{event.key} x{event.count}"] += event.self_cpu_time_total
    return device, calls, host


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama2-7b")
    parser.add_argument("--prompt-tokens", type=int, default=8192)
    parser.add_argument("--budget", type=float, default=0.2)
    parser.add_argument("--policies", default="window,h2o")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    model = build_model(args.shape, "cuda", args.prompt_tokens)
    ids = torch.randint(3, model.config.vocab_size, (1, args.prompt_tokens), device="cuda")

    def plain() -> None:
        model(ids, logits_to_keep=1)

    runs = {"plain": plain}
    for policy in args.policies.split(","):
        config = SqueezeConfig(budget=args.budget, policy=policy)

        def compressed(config: SqueezeConfig = config) -> None:
            with compress(model, config):
                model(ids, logits_to_keep=1)

        runs[policy] = compressed
    with torch.inference_mode():
        sdpa, scoring = attention_ms(model, args.prompt_tokens, 5 * args.rounds)
        print(
            f"one layer's prefill attention: SDPA causal {sdpa:.3f} ms, prefill_attention scoring every "
            f"query {scoring:.3f} ms ({scoring / sdpa:.2f}x)"
        )
        for policy in args.policies.split(","):
            config = SqueezeConfig(budget=args.budget, policy=policy)
            measured = prefill_overhead(model, ids, config, args.rounds)
            print(
                f"{policy} prefill: plain {measured['plain_seconds']:.4f} s, squeezekv "
                f"{measured['squeezekv_seconds']:.4f} s ({100 * measured['overhead']:+.1f} %)"
            )
        profiles = {name: totals(run) for name, run in runs.items()}
    base_device, base_calls, _ = profiles["plain"]
    for name, (device, calls, host) in profiles.items():
        busy = sum(device.values()) / 1e3
        print(f"\n== {name}: GPU kernels {busy:.1f} ms, {sum(calls.values())} kernel launches")
        if name == "plain":
            continue
        extra = Counter({key: device[key] - base_device.get(key, 0) for key in device})
        print(f"  kernels with the most extra GPU time (µs, calls: {name} vs plain):")
        for key, micros in extra.most_common(args.top):
            print(f"    {micros:10.0f}  {calls[key]:5d} vs {base_calls.get(key, 0):5d}  {key[:90]}")
        print("  CUDA runtime calls other than launches (host µs):")
        for key, micros in host.most_common(6):
            print(f"    {micros:10.0f}  {key[:90]}")


if __name__ == "__main__":
    main()
