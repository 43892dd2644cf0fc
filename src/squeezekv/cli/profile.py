"""``squeezekv profile``: per-layer similarity and budgets of one prompt, or grouping stability."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from squeezekv.cli.common import (
    EQUAL_BYTES_HELP,
    KV_BITS_HELP,
    add_model_arguments,
    budgets,
    read_prompt,
    specs,
)
from squeezekv.cli.eval import DEFAULT_ALLOCATORS
from squeezekv.loading import load_model, resolve_device


def add_parser(commands) -> None:
    parser = commands.add_parser("profile", help="per-layer similarity, budgets, and grouping stability")
    add_model_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt-file", help="profile one UTF-8 prompt")
    source.add_argument("--stability", action="store_true", help="grouping stability over held-out prompts")
    parser.add_argument("--limit", type=int, default=20, help="prompts for --stability (default 20)")
    parser.add_argument("--data", help="JSONL documents for --stability (default: the bundled held-out set)")
    parser.add_argument("--context", type=int, default=2048, help="tokens of each prompt kept (default 2048)")
    parser.add_argument("--budget", default="0.2", help="budget the allocators plan for (default 0.2)")
    parser.add_argument("--policy", default="window", help="its floor bounds budgets; similarity ignores it")
    parser.add_argument("--kv-bits", type=int, default=16, help=KV_BITS_HELP)
    parser.add_argument("--equal-bytes", action="store_true", help=EQUAL_BYTES_HELP)
    parser.add_argument(
        "--allocators", default=DEFAULT_ALLOCATORS, help="comma-separated names or specs (squeeze:p=0.5)"
    )
    parser.add_argument("--out", default="profile", help="directory for the JSON and PNG (default ./profile)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=run, interrupted="interrupted; rerun the same command to profile again")


def run(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from squeezekv import SqueezeConfig
    from squeezekv.evaluation import plots, profiling
    from squeezekv.evaluation.data import load_documents
    from squeezekv.evaluation.store import write_atomic

    (budget,) = budgets(args.budget)
    config = SqueezeConfig(
        budget=budget,
        policy=args.policy,
        allocator="uniform",
        kv_bits=args.kv_bits,
        equal_bytes=args.equal_bytes,
    )
    if args.context < 2:
        raise ValueError(f"--context {args.context} must be >= 2")
    device = str(resolve_device(args.device))
    if args.prompt_file is not None:
        texts = [read_prompt(args.prompt_file)]
    else:
        if args.limit < 2:
            raise ValueError(f"--limit {args.limit}: grouping stability needs at least 2 prompts")
        texts = [document["text"] for document in load_documents(args.data)[: args.limit]]
    tokenizer, model = load_model(args.model, device, args.dtype)
    # whole documents are cut to --context on purpose: no warning about their full length
    prompts = [tokenizer(text, verbose=False).input_ids[: args.context] for text in texts]
    if any(not prompt for prompt in prompts):
        raise ValueError("empty prompt: every prompt needs at least one token")
    allocators = list(specs(args.allocators))
    profiles = [
        profiling.layer_profile(model, prompt, config, allocators)
        for prompt in tqdm(prompts, unit="prompt", disable=args.no_progress or len(prompts) == 1, leave=False)
    ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.prompt_file is not None:
        (found,) = profiles
        write_atomic(out / "profile.json", json.dumps(found.__dict__, indent=1) + "\n")
        plots.layer_profile(found.similarity, found.budgets, found.squeezed, out / "profile.png")
        print(profiling.profile_table(found))
        return
    result = profiling.stability(profiles)
    stored = {**result.__dict__, "profiles": [p.__dict__ for p in profiles]}
    write_atomic(out / "stability.json", json.dumps(stored, indent=1) + "\n")
    plots.grouping_stability(result.mean_similarity, result.squeezed_frequency, out / "stability.png")
    print(profiling.stability_table(result))
