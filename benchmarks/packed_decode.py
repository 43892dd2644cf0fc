"""The packed (8- and 4-bit) decode kernel on a GPU against the bf16 kernel, at the precision bench's
shape: 70 sequences x 32 heads x 1,639 slots x 128 channels (Llama-2-7B, 8k prompts, budget 0.2).

    python benchmarks/packed_decode.py

Prints the median of 15 timed replays of each call captured as a CUDA graph (as the fast engine
runs a decode step, so that no launch waits for Python), and the packed kernel's largest difference
from its torch twin, with key groups laid out as a prefill leaves them (slot // 64, 8 % of slots
re-grouped as decode flushes do) and at random; at 8 bits both first passes, the CUDA one that
serves this shape and the Triton one. docs/quantization.md's kernel tables come from this script.
"""

import torch
from projections import graph_ms  # run as a script, benchmarks/ is on the path

from squeezekv.ops import quantized_decode
from squeezekv.ops.decode import decode_attention_triton
from squeezekv.ops.quantized_decode import (
    PackedCodes,
    quantized_decode_attention_torch,
    quantized_decode_attention_triton,
)

BATCH, HEADS, SLOTS, DIM = 70, 32, 1639, 128
KEY_GROUPS = 29
ROUNDS = 15


def packed_codes(bits: int, key_group: torch.Tensor, generator: torch.Generator) -> PackedCodes:
    """Random codes, scales and zeros in the layout the static cache holds (value groups of 64 channels)."""
    shape, width = (BATCH, HEADS), DIM * bits // 8

    def codes() -> torch.Tensor:
        return torch.randint(
            0, 255, (*shape, SLOTS, width), dtype=torch.uint8, device="cuda", generator=generator
        )

    def uniform(*size: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.rand(*shape, *size, device="cuda", generator=generator) * scale).half()

    return PackedCodes(
        bits, codes(), uniform(KEY_GROUPS, DIM, scale=0.01), uniform(KEY_GROUPS, DIM),
        key_group.to(torch.int16), codes(), uniform(SLOTS, 2, scale=0.01), uniform(SLOTS, 2),
    )  # fmt: skip


def time_packed(query, codes: PackedCodes, positions, valid, column, mass) -> tuple[float, float]:
    """One packed call's median time and its largest difference from the torch twin."""
    window = (
        torch.randn(*codes.key_codes.shape[:2], 64, DIM, device="cuda", dtype=query.dtype) for _ in "kv"
    )
    args = (query, codes, *window, (column - 30).view(1), positions, valid, column, None, 0.088, True)
    want = quantized_decode_attention_torch(*args)
    got = quantized_decode_attention_triton(*args)
    error = max((a.float() - b.float()).abs().max().item() for a, b in zip(got, want, strict=True))
    return graph_ms(lambda: quantized_decode_attention_triton(*args, mass), ROUNDS), error


def time_bf16(query, positions, valid, column, mass, generator) -> tuple[float, float]:
    """The bf16 kernel over as many slots: its median time and the bandwidth over keys and values."""
    keys = torch.randn(*query.shape[:2], SLOTS, DIM, device="cuda", dtype=query.dtype, generator=generator)
    values = torch.randn_like(keys)
    args = (query, keys, values, positions, valid, column, None, 0.088, True, mass)
    ms = graph_ms(lambda: decode_attention_triton(*args), ROUNDS)
    return ms, 2 * keys.nbytes / ms / 1e6


def main() -> None:
    generator = torch.Generator(device="cuda").manual_seed(0)
    shape = (BATCH, HEADS)
    query = torch.randn(*shape, 1, DIM, device="cuda", dtype=torch.bfloat16, generator=generator)
    positions = torch.arange(SLOTS, device="cuda").repeat(*shape, 1) + 8000
    valid = torch.ones(*shape, SLOTS, dtype=torch.bool, device="cuda")
    column = positions.max().view(1)
    mass = torch.zeros(*shape, SLOTS, device="cuda")
    ms, rate = time_bf16(query, positions, valid, column, mass, generator)
    print(f"bf16 kernel: {ms:.3f} ms ({rate:.0f} GB/s)", flush=True)
    prefill = (torch.arange(SLOTS, device="cuda") // 64).repeat(*shape, 1)
    flushed = torch.rand(*shape, SLOTS, device="cuda", generator=generator) < 0.08  # re-grouped by decode
    layouts = {
        "prefill": torch.where(flushed, KEY_GROUPS - 1, prefill),
        "random": torch.randint(0, KEY_GROUPS, (*shape, SLOTS), device="cuda", generator=generator),
    }
    serves = quantized_decode.packed8_serves
    for layout, key_group in layouts.items():
        for bits, first_pass in ((8, "CUDA"), (8, "Triton"), (4, "Triton")):
            quantized_decode.packed8_serves = serves if first_pass == "CUDA" else lambda *unused: False
            codes = packed_codes(bits, key_group, generator)
            ms, error = time_packed(query, codes, positions, valid, column, mass)
            packed = sum(part.nbytes for part in codes[1:])
            print(
                f"{layout} key groups, {bits}-bit, {first_pass} first pass: {ms:.3f} ms "
                f"({packed / ms / 1e6:.0f} GB/s of packed bytes); largest |kernel - torch| {error:.3g}",
                flush=True,
            )


if __name__ == "__main__":
    main()
