"""``squeezekv bench``: its options and what running it does (files where the user asked)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from squeezekv.bench.config import BASELINES, BENCH_PRESSES
from squeezekv.bench.shapes import SHAPES
from squeezekv.cli.common import DEVICES, from_arguments
from squeezekv.cli.common import parse_list as comma_list


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "bench", help="throughput and memory against the full cache and transformers"
    )
    add_arguments(parser)
    parser.set_defaults(run=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The bench's options, on its subcommand's parser."""
    parser.add_argument("--shape", default="llama2-7b", help=f"{', '.join(SHAPES)} or a config.json path")
    parser.add_argument("--prompt-tokens", type=int, default=8192)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument(
        "--reference-batch", type=int, default=8, help="the full cache of this batch sets the KV memory limit"
    )
    parser.add_argument("--budgets", type=comma_list(float), default=(0.2,))
    parser.add_argument("--policies", type=comma_list(str), default=("h2o", "window"))
    parser.add_argument("--allocators", type=comma_list(str), default=("squeeze", "uniform"))
    parser.add_argument(
        "--kv-bits",
        type=comma_list(int),
        default=(16,),
        help="comma-separated precisions of the cache, each a path at the same KV memory (default 16)",
    )
    parser.add_argument(
        "--baselines",
        type=comma_list(str),
        default=BASELINES,
        help=f"comma-separated, of {','.join(BASELINES)} (default all)",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed runs per path after a full-length warm-up (default 3)"
    )
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--device", default="auto", help=f"{DEVICES} (default auto)")
    spread = parser.add_mutually_exclusive_group()
    spread.add_argument(
        "--tp", type=int, default=1, help="tensor parallel over this many GPUs (relaunches under torchrun)"
    )
    spread.add_argument(
        "--device-map", help="spread layers over the GPUs with accelerate, e.g. balanced (decodes eagerly)"
    )
    parser.add_argument(
        "--no-cuda-graphs", dest="cuda_graphs", action="store_false", help="decode eagerly on the GPU"
    )
    parser.add_argument(
        "--no-compile-layers",
        dest="compile_layers",
        action="store_false",
        help="keep the layers' norms and MLPs uncompiled and their projections separate in the decode step",
    )
    parser.add_argument(
        "--out", default=".", help="folder for the JSON and markdown results (default: the current folder)"
    )
    parser.add_argument(
        "--peer", choices=sorted(BENCH_PRESSES), help="also run a peer library's presses, in its environment"
    )
    parser.add_argument("--peer-python", help="the Python interpreter of the peer's environment")
    parser.add_argument(
        "--peer-presses",
        type=comma_list(str),
        default=BENCH_PRESSES["kvpress"],
        help=f"comma-separated (default {','.join(BENCH_PRESSES['kvpress'])})",
    )
    add_workload_arguments(parser)


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    """The serving benchmark's options: with ``--workload``, the bench serves a request trace instead."""
    from squeezekv.cli.serve import parse_bytes

    group = parser.add_argument_group("serving benchmark (with --workload)")
    group.add_argument(
        "--workload", choices=["poisson"], help="serve a seeded request trace at equal KV memory"
    )
    group.add_argument("--model", help="a model folder to serve instead of --shape's random weights")
    group.add_argument("--requests", type=int, default=32)
    group.add_argument("--rate", type=float, default=1.0, help="arrivals per second (default 1)")
    group.add_argument(
        "--prompt-range", type=comma_list(int), default=(1024, 16384), help="default 1024,16384"
    )
    group.add_argument("--answer-range", type=comma_list(int), default=(32, 512), help="default 32,512")
    group.add_argument(
        "--kv-memory",
        type=parse_bytes,
        help="KV memory of every path (default: --reference-batch full caches of the longest request)",
    )
    group.add_argument("--block-size", type=int, default=16)
    group.add_argument("--prefill-chunk", type=int, help="prefill prompts in chunks of this many tokens")
    group.add_argument(
        "--hf-compile-level",
        type=int,
        default=0,
        help="transformers' continuous batching compiled at this default_compile_level (0-3; default 0: "
        "not compiled); shapes first met during the trace compile inside the timed run",
    )


def output_folder(out: str) -> Path:
    """``out`` (relative to the current folder) created and writable, before anything is measured."""
    folder = Path(out).expanduser().resolve()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"--out {out!r} cannot be created as a folder: {error.strerror}") from None
    if not os.access(folder, os.W_OK):
        raise ValueError(f"--out {out!r} ({folder}) is not writable")
    return folder


def run(args: argparse.Namespace) -> None:
    """Measures, writes the report into ``--out``, prints it; fails (after writing) when a path held
    more KV memory than the limit."""
    import torch

    from squeezekv.bench.config import BenchConfig
    from squeezekv.bench.orchestrate import benchmark, check_memory
    from squeezekv.bench.report import markdown, write_report
    from squeezekv.distributed import is_first_rank

    if args.workload is not None:
        from squeezekv.bench.serving import run_workload

        run_workload(args)
        return
    if args.device_map is not None:
        args.cuda_graphs = False  # one CUDA graph cannot span the devices of a device_map
    config = from_arguments(BenchConfig, args)
    folder = output_folder(args.out)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if config.tp > 1 and config.device != "cpu" and torch.cuda.device_count() < config.tp:
        raise ValueError(f"--tp {config.tp} needs {config.tp} GPUs, {torch.cuda.device_count()} are visible")
    if config.tp > 1 and world == 1:  # one process per rank, started by torchrun
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        launch += [f"--nproc-per-node={config.tp}", "-m", "squeezekv.cli", *args.argv]
        completed = subprocess.run(launch, check=False)
        if completed.returncode:
            raise SystemExit(completed.returncode)
        return
    if world != config.tp:
        raise ValueError(f"--tp {config.tp} under torchrun needs WORLD_SIZE {config.tp}, not {world}")
    report = benchmark(config)
    if is_first_rank():
        paths = write_report(report, folder)
        print(markdown(report))
        print("written: " + ", ".join(str(path) for path in paths))
    check_memory(report)
