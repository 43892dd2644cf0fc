"""Decode attention and its combine per layer, by layer width and by the slots a program takes
(``DECODE_CHUNK``), at the benches' decode batches: is a narrow (squeezed) layer slow?

    python benchmarks/decode_widths.py --widths 384,768,1640,2600 --chunks 128,256,512

For each shape and width, 8 layers' distinct bf16 tensors (every slot valid) are attended in one
captured CUDA graph; prints the median of 10 replays divided by 8, in µs a layer, without and with
the attention mass, and the bandwidth over the keys and values. docs/performance.md's "Fourth round
on 2026-12-02" tables were timed this way, by an ad hoc predecessor of this script.
"""

from __future__ import annotations

import argparse

import torch
from projections import graph_ms  # run as a script, benchmarks/ is on the path

from squeezekv.ops import decode

# batch, key-value heads, query heads a key-value head (the benches' decode batches at budget 0.2)
SHAPES = {"llama2-7b": (41, 32, 1), "mistral-7b": (36, 8, 4), "qwen2.5-7b": (41, 4, 7)}
LAYERS = 8
DIM = 128


def report(name: str, width: int, chunks: list[int]) -> None:
    batch, kv_heads, group = SHAPES[name]
    generator = torch.Generator(device="cuda").manual_seed(0)

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=generator)

    def states() -> torch.Tensor:
        return normal(batch, kv_heads, width, DIM)

    layers = [
        (
            states(), states(), torch.arange(width, device="cuda").repeat(batch, 1, 1),
            torch.ones(batch, 1, width, dtype=torch.bool, device="cuda"),
            torch.zeros(batch, kv_heads, width, device="cuda"),
        )
        for _ in range(LAYERS)
    ]  # fmt: skip
    query = normal(batch, kv_heads * group, 1, DIM)
    column = torch.tensor([width - 1], device="cuda")
    cells = []
    for chunk in chunks:
        decode.DECODE_CHUNK = chunk  # read at each call: the splits and the kernel's chunk
        for with_mass in (False, True):

            def run(with_mass=with_mass) -> None:
                for keys, values, positions, valid, mass in layers:
                    decode.decode_attention_triton(
                        query, keys, values, positions, valid, column, None, DIM**-0.5, with_mass,
                        mass if with_mass else None,
                    )  # fmt: skip

            us = 1e3 * graph_ms(run, replays=10) / LAYERS
            rate = 2 * layers[0][0].nbytes / us / 1e3
            cells.append(f"{chunk}{' mass' if with_mass else ''}: {us:.1f} µs, {rate:.0f} GB/s")
    print(f"{name} {width} slots | " + " | ".join(cells), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", default="384,768,1640,2600", help="slots a layer holds, comma-separated")
    parser.add_argument("--chunks", default="128,256,512", help="slots a program takes, comma-separated")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"of {', '.join(SHAPES)}")
    args = parser.parse_args()
    chunks = [int(chunk) for chunk in args.chunks.split(",")]
    committed = decode.DECODE_CHUNK
    try:
        for name in args.shapes.split(","):
            for width in (int(width) for width in args.widths.split(",")):
                report(name, width, chunks)
    finally:
        decode.DECODE_CHUNK = committed


if __name__ == "__main__":
    main()
