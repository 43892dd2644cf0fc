"""``squeezekv bench``: argument parsing and launching only; the measuring lives in ``squeezekv.bench``."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from squeezekv.cli.common import from_arguments, parse_list, resolve_device


def add_parser(commands) -> None:
    from squeezekv.evaluation.peer import BENCH_PRESSES

    bench = commands.add_parser("bench", help="throughput and memory against the full cache and transformers")
    bench.add_argument(
        "--shape", default="llama2-7b", help="llama2-7b, mistral-7b, tiny or a config.json path"
    )
    bench.add_argument("--prompt-tokens", type=int, default=8192)
    bench.add_argument("--new-tokens", type=int, default=256)
    bench.add_argument(
        "--reference-batch", type=int, default=8, help="the full cache of this batch sets the memory"
    )
    bench.add_argument("--budgets", type=parse_list(float), default=(0.2,))
    bench.add_argument("--policies", type=parse_list(str), default=("h2o", "window"))
    bench.add_argument("--allocators", type=parse_list(str), default=("squeeze", "uniform"))
    bench.add_argument("--baselines", type=parse_list(str), default=("hf_dynamic", "hf_static", "full"))
    bench.add_argument("--max-batch", type=int, default=256)
    bench.add_argument("--device", default="cuda")
    spread = bench.add_mutually_exclusive_group()
    spread.add_argument(
        "--tp", type=int, default=1, help="tensor parallel over this many GPUs (relaunches under torchrun)"
    )
    spread.add_argument(
        "--device-map", help="spread layers over the GPUs with accelerate, e.g. balanced (decodes eagerly)"
    )
    bench.add_argument(
        "--no-cuda-graphs", dest="cuda_graphs", action="store_false", help="decode eagerly on the GPU"
    )
    bench.add_argument(
        "--no-compile-layers",
        dest="compile_layers",
        action="store_false",
        help="keep the layers' norms and MLPs uncompiled in the captured decode step",
    )
    bench.add_argument(
        "--out", default="benchmarks/results", help="directory for the JSON and markdown results"
    )
    bench.add_argument(
        "--peer", choices=sorted(BENCH_PRESSES), help="also run a peer library's presses, in its environment"
    )
    bench.add_argument("--peer-python", help="the Python interpreter of the peer's environment")
    bench.add_argument(
        "--peer-presses",
        type=parse_list(str),
        default=BENCH_PRESSES["kvpress"],
        help=f"comma-separated (default {','.join(BENCH_PRESSES['kvpress'])})",
    )
    bench.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    import torch

    from squeezekv.bench import BenchConfig, markdown, write_report
    from squeezekv.bench import run as measure
    from squeezekv.distributed import is_first_rank

    if args.device_map is not None:
        args.cuda_graphs = False  # one CUDA graph cannot span the devices of a device_map
    if args.tp > 1 and args.device != "cpu" and torch.cuda.device_count() < args.tp:
        raise ValueError(f"--tp {args.tp} needs {args.tp} GPUs, {torch.cuda.device_count()} are visible")
    args.device = resolve_device(args.device)  # a device this machine lacks: one line, before any work
    config = from_arguments(BenchConfig, args)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if config.tp > 1 and world == 1:  # one process per rank, started by torchrun
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        launch += [f"--nproc-per-node={config.tp}", "-m", "squeezekv.cli", *args.argv]
        completed = subprocess.run(launch, check=False)
        if completed.returncode:
            raise SystemExit(completed.returncode)
        return
    if world != config.tp:
        raise ValueError(f"--tp {config.tp} under torchrun needs WORLD_SIZE {config.tp}, not {world}")
    report = measure(config)
    if is_first_rank():
        paths = write_report(report, Path(args.out))
        print(markdown(report))
        print("written: " + ", ".join(str(path) for path in paths))
