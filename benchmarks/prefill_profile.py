"""Where squeezekv's prefill overhead goes: plain forward vs the compressed prefill, on one GPU.

For a random-weight model of a bench shape and one prompt, prints the wall time of each (median of
``--rounds``), the GPU time its kernels take, and the kernels and host calls whose totals differ
most between the two, so that the cost of importance, planning and eviction can be told apart
from time the GPU spends waiting for the host.

    python benchmarks/prefill_profile.py --shape llama2-7b --prompt-tokens 8192 --policies window,h2o
"""

from __future__ import annotations

import argparse
import statistics
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

from squeezekv.bench import build_model
from squeezekv.config import SqueezeConfig
from squeezekv.distributed import synchronized
from squeezekv.session import compress


def timed(run, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        started = synchronized(torch.device("cuda"))
        run()
        times.append(synchronized(torch.device("cuda")) - started)
    return statistics.median(times)


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
    parser.add_argument("--rounds", type=int, default=5)
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
        for run in runs.values():
            run()  # warm-up: kernels compiled, allocator settled
        walls = {name: timed(run, args.rounds) for name, run in runs.items()}
        profiles = {name: totals(run) for name, run in runs.items()}
    base_device, base_calls, _ = profiles["plain"]
    for name, (device, calls, host) in profiles.items():
        busy = sum(device.values()) / 1e3
        print(
            f"\n== {name}: wall {1e3 * walls[name]:.1f} ms, GPU kernels {busy:.1f} ms, "
            f"{sum(calls.values())} kernel launches"
        )
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
