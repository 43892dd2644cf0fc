"""How fast a decode step's matrix products stream their weights, separately and joined, on a GPU.

    python benchmarks/projections.py --shapes mistral-7b,qwen2.5-7b,llama2-7b --batches 8,36,82

For each bench shape and batch, every layer gets weights of its own (so that no layer's weights sit
in the L2 cache for the next), and the products of all layers are captured as one CUDA graph, as the
fast engine's step is. Prints each projection's time per layer and the bandwidth it reaches, then
the whole set of products per step: query, key, value, output, gate, up and down separately,
against query-key-value and gate-up joined (:mod:`squeezekv.fusion`). Median of 20 replays.
"""

import argparse
import statistics

import torch
import torch.nn.functional as F

from squeezekv.bench.shapes import shape_config

SEPARATE = ("q", "k", "v", "o", "gate", "up", "down")
JOINED = ("qkv", "o", "gate_up", "down")


def graph_ms(run, replays: int = 20) -> float:
    """Median time of one replay of ``run`` captured as a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def layer_weights(config) -> list[dict[str, torch.Tensor]]:
    hidden, inner = config.hidden_size, config.intermediate_size
    dim = hidden // config.num_attention_heads
    sizes = dict(
        q=(config.num_attention_heads * dim, hidden),
        k=(config.num_key_value_heads * dim, hidden),
        v=(config.num_key_value_heads * dim, hidden),
        o=(hidden, config.num_attention_heads * dim),
        gate=(inner, hidden),
        up=(inner, hidden),
        down=(hidden, inner),
    )
    layers = []
    for _ in range(config.num_hidden_layers):
        weights = {
            name: torch.randn(size, device="cuda", dtype=torch.bfloat16) for name, size in sizes.items()
        }
        weights["qkv"] = torch.cat([weights["q"], weights["k"], weights["v"]])
        weights["gate_up"] = torch.cat([weights["gate"], weights["up"]])
        layers.append(weights)
    return layers


def products(layers, rows: torch.Tensor, inner_rows: torch.Tensor, names: tuple[str, ...]):
    """Every layer's products with the weights ``names``, as one function to capture."""
    return lambda: [
        F.linear(inner_rows if name == "down" else rows, layer[name]) for layer in layers for name in names
    ]


def report(shape: str, batches: list[int]) -> None:
    config = shape_config(shape)
    layers = layer_weights(config)
    step_bytes = sum(layer[name].numel() * 2 for layer in layers for name in SEPARATE)
    for batch in batches:
        rows = torch.randn(batch, config.hidden_size, device="cuda", dtype=torch.bfloat16)
        inner_rows = torch.randn(batch, config.intermediate_size, device="cuda", dtype=torch.bfloat16)
        for name in (*SEPARATE, "qkv", "gate_up"):
            ms = graph_ms(products(layers, rows, inner_rows, (name,)))
            gigabytes = sum(layer[name].numel() * 2 for layer in layers) / 1e9
            per_layer = 1e3 * ms / len(layers)
            print(
                f"{shape} batch {batch} {name:8s} {per_layer:6.1f} µs/layer {gigabytes / ms * 1e3:6.0f} GB/s"
            )
        separate = graph_ms(products(layers, rows, inner_rows, SEPARATE))
        joined = graph_ms(products(layers, rows, inner_rows, JOINED))
        print(
            f"{shape} batch {batch} all layers: separate {separate:.3f} ms "
            f"({step_bytes / separate / 1e6:.0f} GB/s), "
            f"joined {joined:.3f} ms ({step_bytes / joined / 1e6:.0f} GB/s)",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="mistral-7b,qwen2.5-7b,llama2-7b")
    parser.add_argument("--batches", default="8,36,82")
    args = parser.parse_args()
    for shape in args.shapes.split(","):
        report(shape, [int(batch) for batch in args.batches.split(",")])
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
