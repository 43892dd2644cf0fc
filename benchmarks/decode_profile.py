"""Where a decode step's time goes: the fast engine's step per policy, on one GPU.

For a random-weight model of a bench shape, every layer holding ``--slots`` tokens in each of
``--batch`` sequences (prompts of ``--slots`` tokens at a budget of ``--slots`` - 1 tokens, so the
buffers are as full as in a long run), prints the captured step's time with the compiled parts
(norms, MLPs, rotary embeddings) compiled and not, and the kernels of one eager step (parts
compiled), summed by name, with each policy's difference from the first one's.

    python benchmarks/decode_profile.py --shape llama2-7b --batch 41 --slots 1640 --policies window,h2o
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch
from prefill_profile import totals

from squeezekv.bench.shapes import build_model
from squeezekv.config import SqueezeConfig
from squeezekv.engine import FastGenerator, compiled_parts
from squeezekv.session import routed_attention


def step_ms(model, ids: torch.Tensor, config: SqueezeConfig, new_tokens: int, compile_layers: bool) -> float:
    generator = FastGenerator(model, config, compile_layers=compile_layers)
    generator.generate(ids, max_new_tokens=new_tokens, prefill_batch=8)
    return 1e3 * generator.steady_step_seconds


def eager_step_kernels(
    model, ids: torch.Tensor, config: SqueezeConfig, steps: int
) -> tuple[Counter, Counter]:
    """Device µs and launches per kernel name over ``steps`` eager steps, layers compiled."""
    generator = FastGenerator(model, config, cuda_graphs=False)
    result = generator.generate(ids, max_new_tokens=2, prefill_batch=8)
    tokens, positions = result.sequences[:, -1:], torch.full_like(ids[:, :1], ids.shape[1] + 1)
    with (
        routed_attention(model, generator.architecture, generator),
        compiled_parts(model, generator.architecture),
    ):
        step = generator.decode_steps(tokens, positions, steps)
        step()  # compiles

        def run() -> None:
            for _ in range(steps):
                step()

        device, calls, _ = totals(run)
    return device, calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama2-7b")
    parser.add_argument("--batch", type=int, default=41)
    parser.add_argument("--slots", type=int, default=1640)
    parser.add_argument("--policies", default="window,h2o")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--top", type=int, default=16)
    args = parser.parse_args()
    model = build_model(args.shape, "cuda", args.slots + args.new_tokens)
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.slots), device="cuda")
    policies = args.policies.split(",")
    profiles = {}
    with torch.inference_mode():
        for policy in policies:
            config = SqueezeConfig(budget=args.slots - 1, policy=policy, allocator="uniform")
            times = {c: step_ms(model, ids, config, args.new_tokens, c) for c in (True, False)}
            print(f"{policy}: {times[True]:.2f} ms/step compiled layers, {times[False]:.2f} eager layers")
            profiles[policy] = eager_step_kernels(model, ids, config, steps=3)
    base_device, base_calls = profiles[policies[0]]
    for policy, (device, calls) in profiles.items():
        print(
            f"\n== {policy}: eager step, GPU kernels {sum(device.values()) / 3e3:.2f} ms, "
            f"{sum(calls.values()) / 3:.0f} launches per step"
        )
        print(f"  kernels by GPU time (µs per step, launches per step; vs {policies[0]}):")
        for key, micros in device.most_common(args.top):
            extra = (micros - base_device.get(key, 0)) / 3
            print(
                f"    {micros / 3:9.0f} {calls[key] / 3:6.0f} {extra:+9.0f} "
                f"{base_calls.get(key, 0) / 3:6.0f}  {key[:80]}"
            )


if __name__ == "__main__":
    main()
