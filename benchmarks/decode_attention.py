"""Per-layer decode attention on a GPU: the Triton kernel against SDPA and the plain scoring path.

    python benchmarks/decode_attention.py

Prints, for a few buffer shapes (batch, query heads, key-value heads, slots; head size 128, bf16),
the median time of one call of each path and the bandwidth it reaches over the keys and values.
"""

import torch

from squeezekv.ops.attention import attend
from squeezekv.ops.decode import decode_attention_triton

SHAPES = ((41, 32, 32, 1640), (8, 32, 32, 8449), (16, 32, 8, 8449))


def median_us(fn, reps: int = 30) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / reps * 1000)
    return sorted(times)[2]


def report(batch: int, q_heads: int, kv_heads: int, slots: int) -> None:
    q = torch.randn(batch, q_heads, 1, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, kv_heads, slots, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    valid = torch.rand(batch, kv_heads, slots, device="cuda") > 0.01
    positions = torch.arange(slots, device="cuda").expand(batch, kv_heads, -1).contiguous()
    column = torch.tensor([slots - 1], device="cuda")
    mask, scale = valid.unsqueeze(2), 128**-0.5
    buffer = (q, k, v, positions, valid, column, None, scale)
    paths = {
        "sdpa (masked)": lambda: attend(q, k, v, mask, scale, 0),
        "plain path with mass": lambda: attend(q, k, v, mask, scale, 1),
        "kernel": lambda: decode_attention_triton(*buffer, False),
        "kernel with mass": lambda: decode_attention_triton(*buffer, True),
    }
    kv_bytes = 2 * k.numel() * k.element_size()
    print(f"batch {batch}, heads {q_heads}/{kv_heads}, slots {slots} ({kv_bytes / 1e6:.0f} MB of K and V)")
    for name, fn in paths.items():
        us = median_us(fn)
        print(f"  {name:22s} {us:7.0f} us  {kv_bytes / us / 1e3:5.0f} GB/s")


def main() -> None:
    for shape in SHAPES:
        report(*shape)


if __name__ == "__main__":
    main()
