"""``squeezekv bench --workload``: the serving benchmark's run, report files and memory check."""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time

import torch

from squeezekv.bench.workload import Workload, check_workload_memory, serving_benchmark, workload_markdown
from squeezekv.config import SqueezeConfig


def run_workload(args: argparse.Namespace) -> None:
    """Serves the trace through every path, writes ``<name>-serving-<time>.json`` and ``.md`` into
    ``--out``, prints the table; fails (after writing) when a path held more KV than the limit."""
    from squeezekv.bench.shapes import build_model
    from squeezekv.cli.bench import output_folder
    from squeezekv.loading import load_model, resolve_device

    if len(args.prompt_range) != 2 or len(args.answer_range) != 2:
        raise ValueError("--prompt-range and --answer-range take two token counts: LOW,HIGH")
    workload = Workload(
        requests=args.requests,
        rate=args.rate,
        prompt_range=tuple(args.prompt_range),
        answer_range=tuple(args.answer_range),
        kv_memory=args.kv_memory,
        block_size=args.block_size,
        prefill_chunk=args.prefill_chunk,
        cuda_graphs=args.cuda_graphs,
        hf_compile_level=args.hf_compile_level,
    )
    configs = [
        SqueezeConfig(budget=budget, policy=policy, allocator=allocator)
        for budget in args.budgets
        for policy in args.policies
        for allocator in args.allocators
    ]
    folder = output_folder(args.out)
    device = str(resolve_device(args.device))
    torch.manual_seed(0)
    if args.model is not None:
        _, model = load_model(args.model, device)
        name = args.model.rstrip("/").split("/")[-1]
    else:
        model = build_model(args.shape, device, workload.longest)
        name = args.shape.rstrip("/").split("/")[-1].removesuffix(".json")
    stem = f"{name}-serving-{datetime.datetime.now(datetime.timezone.utc).strftime('%Y%m%dT%H%M%S')}"
    started = time.perf_counter()

    def write(report: dict) -> None:
        """The files as they stand, rewritten after every path (a stopped run keeps what it did)."""
        report["model"], report["device"] = name, device
        (folder / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        (folder / f"{stem}.md").write_text(workload_markdown(report) + "\n", encoding="utf-8")
        last = report["results"][-1]
        print(
            f"{last['path']} (budget {last['budget'] or 1.0}) done, {time.perf_counter() - started:.0f} s "
            f"into the run; {folder / stem}.md updated",
            file=sys.stderr,
            flush=True,
        )

    hf = any(baseline.startswith("hf") for baseline in args.baselines)
    report = serving_benchmark(
        model, configs, workload, args.reference_batch, hf=hf, on_path=write, full="full" in args.baselines
    )
    print(workload_markdown(report))
    print(f"written: {folder / stem}.json, {folder / stem}.md")
    check_workload_memory(report)
