"""The ``eval`` and ``profile`` subcommands: argument parsing and wiring only."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DEFAULT_POLICIES = "window,streaming,h2o,snapkv"
DEFAULT_ALLOCATORS = "uniform,squeeze,pyramid"


def names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def budgets(text: str) -> tuple[float | int, ...]:
    """Comma-separated budgets: fractions like 0.2, or whole tokens per layer like 512."""
    from squeezekv.cli import parse_budget

    try:
        return tuple(parse_budget(part) for part in names(text))
    except argparse.ArgumentTypeError as error:
        raise ValueError(str(error)) from None


def numbers(text: str | None, kind: type) -> tuple | None:
    if text is None:
        return None
    try:
        return tuple(kind(part) for part in names(text))
    except ValueError:
        raise ValueError(f"{text!r} is not a comma-separated list of {kind.__name__} values") from None


def add_eval(commands) -> None:
    from squeezekv.cli import add_model_arguments
    from squeezekv.evaluation.peer import PRESSES
    from squeezekv.evaluation.tasks import TASKS

    parser = commands.add_parser(
        "eval", help="quality per budget for every policy × allocator, at equal memory"
    )
    add_model_arguments(parser)
    parser.add_argument("--task", required=True, help=f"one of {', '.join(sorted(TASKS))}")
    parser.add_argument("--budgets", default="0.1,0.2,0.3,0.5", help="comma-separated budgets")
    parser.add_argument("--policies", default=DEFAULT_POLICIES)
    parser.add_argument("--allocators", default=DEFAULT_ALLOCATORS)
    parser.add_argument("--p", type=float, help="squeeze allocator: the squeezed group's share")
    parser.add_argument("--limit", type=int, help="evaluate only the first N samples")
    parser.add_argument("--out", required=True, help="output directory (a rerun resumes it)")
    parser.add_argument("--data", help="JSONL input (default: the bundled held-out documents)")
    parser.add_argument(
        "--context", type=int, help="tokens per window or prompt limit (default: model's, <= 2048)"
    )
    parser.add_argument("--score-tokens", type=int, default=256, help="ppl/fidelity tokens scored per window")
    parser.add_argument("--passkey-lengths", help="comma-separated prompt lengths in tokens")
    parser.add_argument(
        "--passkey-depths", default="0,0.25,0.5,0.75,1", help="comma-separated depths in [0, 1]"
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peer", choices=sorted(PRESSES), help="also run a peer library's presses")
    parser.add_argument("--peer-python", help="the Python interpreter of the peer's environment")
    parser.add_argument("--peer-presses", help="comma-separated (default: all the peer offers)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=run_eval_command)


def run_eval_command(args: argparse.Namespace) -> None:
    from squeezekv.cli import load_model
    from squeezekv.evaluation import EvalConfig, TaskOptions, run_eval
    from squeezekv.evaluation.peer import PRESSES
    from squeezekv.evaluation.tasks import TASKS

    if args.task not in TASKS:
        raise ValueError(f"unknown task {args.task!r}; choose one of {sorted(TASKS)}")
    presses = ()
    if args.peer:
        presses = names(args.peer_presses) if args.peer_presses else PRESSES[args.peer]
        unknown = sorted(set(presses) - set(PRESSES[args.peer]))
        if unknown:
            raise ValueError(f"unknown {args.peer} presses {unknown}; choose from {list(PRESSES[args.peer])}")
    options = TaskOptions(
        data=args.data,
        context=args.context,
        score_tokens=args.score_tokens,
        passkey_lengths=numbers(args.passkey_lengths, int),
        passkey_depths=numbers(args.passkey_depths, float),
        seed=args.seed,
    )
    config = EvalConfig(
        task=args.task,
        model=model_name(args.model),
        budgets=budgets(args.budgets),
        policies=names(args.policies),
        allocators=names(args.allocators),
        **({} if args.p is None else {"p": args.p}),
        limit=args.limit,
        dtype=args.dtype,
        options=options,
        peer=args.peer,
        peer_presses=tuple(presses),
        device=args.device,
        batch_size=args.batch_size,
        peer_python=args.peer_python,
    )
    tokenizer, model = load_model(config.model, args.device, args.dtype)
    print(
        run_eval(config, model, tokenizer, args.out, progress=not args.no_progress).read_text(
            encoding="utf-8"
        )
    )


def model_name(model: str | None) -> str:
    if model is not None:
        return model
    from squeezekv.reference import reference_model_path

    return str(reference_model_path())


def add_profile(commands) -> None:
    from squeezekv.cli import add_model_arguments

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
    parser.add_argument("--groups", type=int)
    parser.add_argument("--p", type=float)
    parser.add_argument("--allocators", default=DEFAULT_ALLOCATORS)
    parser.add_argument("--out", default="profile", help="directory for the JSON and PNG (default ./profile)")
    parser.set_defaults(run=run_profile_command)


def run_profile_command(args: argparse.Namespace) -> None:
    from squeezekv import SqueezeConfig
    from squeezekv.cli import load_model
    from squeezekv.evaluation import plots, profiling
    from squeezekv.evaluation.data import load_documents

    (budget,) = budgets(args.budget)
    settings = {name: getattr(args, name) for name in ("groups", "p") if getattr(args, name) is not None}
    config = SqueezeConfig.build(budget=budget, policy=args.policy, allocator="squeeze", **settings)
    if args.context < 2:
        raise ValueError(f"--context {args.context} must be >= 2")
    if args.prompt_file is not None:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompt file {str(path)!r} does not exist")
        texts = [path.read_text(encoding="utf-8")]
    else:
        if args.limit < 2:
            raise ValueError(f"--limit {args.limit}: grouping stability needs at least 2 prompts")
        texts = [document["text"] for document in load_documents(args.data)[: args.limit]]
    tokenizer, model = load_model(args.model, args.device, args.dtype)
    prompts = [tokenizer(text).input_ids[: args.context] for text in texts]
    if any(not prompt for prompt in prompts):
        raise ValueError("empty prompt: every prompt needs at least one token")
    profiles = [
        profiling.layer_profile(model, prompt, config, list(names(args.allocators))) for prompt in prompts
    ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.prompt_file is not None:
        (found,) = profiles
        (out / "profile.json").write_text(json.dumps(found.__dict__, indent=1) + "\n", encoding="utf-8")
        plots.layer_profile(found.similarity, found.budgets, found.squeezed, out / "profile.png")
        print(profiling.profile_table(found))
        return
    result = profiling.stability(profiles)
    stored = {**result.__dict__, "profiles": [p.__dict__ for p in profiles]}
    (out / "stability.json").write_text(json.dumps(stored, indent=1) + "\n", encoding="utf-8")
    plots.grouping_stability(result.mean_similarity, result.squeezed_frequency, out / "stability.png")
    print(profiling.stability_table(result))
