"""``squeezekv profile``: per-layer similarity and budgets of one prompt, grouping stability, or
per-layer sensitivity (what the ``oracle`` allocator reads)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from squeezekv.cli.common import (
    EQUAL_BYTES_HELP,
    KV_BITS_HELP,
    KV_GROUP_HELP,
    add_model_arguments,
    budgets,
    read_prompt,
    specs,
)
from squeezekv.cli.eval import DEFAULT_ALLOCATORS
from squeezekv.loading import load_model, resolve_device
from squeezekv.ops.quantize import KEY_GROUP_TOKENS


def add_parser(commands) -> None:
    parser = commands.add_parser("profile", help="per-layer similarity, budgets, and grouping stability")
    add_model_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt-file", help="profile one UTF-8 prompt")
    source.add_argument("--stability", action="store_true", help="grouping stability over held-out prompts")
    source.add_argument(
        "--sensitivity",
        metavar="OUT.json",
        help="per-layer sensitivity (NLL rise, one layer at p x budget) on ppl windows: the oracle reads it",
    )
    parser.add_argument("--limit", type=int, default=20, help="prompts or documents (default 20)")
    parser.add_argument(
        "--skip", type=int, default=0, help="--sensitivity: skip the first N ppl windows (keep them for eval)"
    )
    parser.add_argument("--data", help="JSONL documents (default: the bundled held-out set)")
    parser.add_argument(
        "--p", type=float, default=0.35, help="--sensitivity: the squeezed share (default 0.35)"
    )
    parser.add_argument(
        "--score-tokens", type=int, default=64, help="--sensitivity: tokens scored per window (default 64)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=4, help="--sensitivity: windows per batch (default 4)"
    )
    parser.add_argument("--context", type=int, default=2048, help="tokens of each prompt kept (default 2048)")
    parser.add_argument("--budget", default="0.2", help="budget the allocators plan for (default 0.2)")
    parser.add_argument("--policy", default="window", help="its floor bounds budgets; similarity ignores it")
    parser.add_argument("--kv-bits", type=int, default=16, help=KV_BITS_HELP)
    parser.add_argument("--equal-bytes", action="store_true", help=EQUAL_BYTES_HELP)
    parser.add_argument("--kv-group", type=int, default=KEY_GROUP_TOKENS, help=KV_GROUP_HELP)
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
        kv_group=args.kv_group,
    )
    if args.context < 2:
        raise ValueError(f"--context {args.context} must be >= 2")
    device = str(resolve_device(args.device))
    if args.sensitivity is not None:
        return run_sensitivity(args, config, device)
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


def run_sensitivity(args: argparse.Namespace, config, device: str) -> None:
    """Measures per-layer sensitivity on ppl windows ``--skip`` .. ``--skip + --limit`` and writes it."""
    from squeezekv.allocators.squeeze import Squeeze
    from squeezekv.cli.common import model_name
    from squeezekv.evaluation import sensitivity
    from squeezekv.evaluation.runner import whole_documents_tokenized
    from squeezekv.evaluation.store import write_atomic
    from squeezekv.evaluation.tasks import TaskOptions, task_named

    out = Path(args.sensitivity)
    if out.suffix != ".json":
        raise ValueError(f"--sensitivity {str(out)!r} must name a .json file")
    if args.limit < 1 or args.skip < 0 or args.batch_size < 1:
        raise ValueError(
            f"--limit {args.limit} and --batch-size {args.batch_size} must be >= 1, --skip {args.skip} >= 0"
        )
    Squeeze(p=args.p)  # refuses a p out of range, named
    options = TaskOptions(data=args.data, context=args.context, score_tokens=args.score_tokens)
    name = model_name(args.model)
    tokenizer, model = load_model(name, device, args.dtype)
    with whole_documents_tokenized():
        windows = task_named("ppl", options).samples(tokenizer, model)
    samples = windows[args.skip : args.skip + args.limit]
    if not samples:
        raise ValueError(
            f"--skip {args.skip}: only {len(windows)} ppl windows of {args.context} tokens exist"
        )
    settings = {
        "context": args.context,
        "score_tokens": args.score_tokens,
        "data": args.data,
        "skip": args.skip,
    }
    stored = sensitivity.sensitivity_record(
        model,
        Path(name).name,
        samples,
        settings,
        config.budget,
        config.policy.spec,
        args.p,
        args.batch_size,
        progress=not args.no_progress,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, json.dumps(stored, indent=1) + "\n")
    print(sensitivity.sensitivity_table(stored))
