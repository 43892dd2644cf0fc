"""``squeezekv eval``: argument parsing and wiring only; the grid runs in ``squeezekv.evaluation``."""

from __future__ import annotations

import argparse
import sys

from squeezekv.cli.common import (
    EQUAL_BYTES_HELP,
    KV_GROUP_HELP,
    add_model_arguments,
    budgets,
    model_name,
    names,
    numbers,
    specs,
)
from squeezekv.evaluation.decoding import ENGINES
from squeezekv.loading import load_model, resolve_device
from squeezekv.ops.quantize import KEY_GROUP_TOKENS

DEFAULT_POLICIES = "window,streaming,h2o,snapkv"
DEFAULT_ALLOCATORS = "uniform,squeeze,pyramid"
INTERRUPTED = "interrupted; rerun with the same --out to resume"


def add_parser(commands) -> None:
    from squeezekv.evaluation.peer import PRESSES
    from squeezekv.evaluation.tasks import TASKS
    from squeezekv.evaluation.tasks.ruler import QUESTION_SETTINGS

    parser = commands.add_parser(
        "eval", help="quality per budget for every policy × allocator, at equal memory"
    )
    add_model_arguments(parser)
    parser.add_argument("--task", required=True, help=f"one of {', '.join(sorted(TASKS))}")
    parser.add_argument(
        "--budgets",
        required=True,
        help="comma-separated budgets, e.g. 0.2,0.5 (each one adds a cell per policy × allocator)",
    )
    parser.add_argument(
        "--policies", default=DEFAULT_POLICIES, help=f"comma-separated (default {DEFAULT_POLICIES})"
    )
    parser.add_argument(
        "--allocators",
        default=DEFAULT_ALLOCATORS,
        help=f"comma-separated names or specs such as squeeze:p=0.5 (default {DEFAULT_ALLOCATORS})",
    )
    parser.add_argument(
        "--kv-bits",
        default="16",
        help="comma-separated key-value precisions, a grid axis: 16 (default), 8, 4",
    )
    parser.add_argument("--equal-bytes", action="store_true", help=EQUAL_BYTES_HELP)
    parser.add_argument("--kv-group", type=int, default=KEY_GROUP_TOKENS, help=KV_GROUP_HELP)
    parser.add_argument(
        "--quantized-cache",
        help="comma-separated bits (2, 4): also run transformers' QuantizedCache (quanto backend, every "
        'token kept) at each, the peer of --kv-bits (needs pip install "squeezekv[quanto]")',
    )
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
    parser.add_argument("--ruler-subtasks", help="comma-separated RULER subtasks (default: all eleven)")
    parser.add_argument("--ruler-lengths", help="comma-separated RULER prompt lengths in tokens")
    parser.add_argument("--ruler-samples", type=int, default=100, help="samples per RULER subtask and length")
    parser.add_argument(
        "--ruler-question",
        choices=QUESTION_SETTINGS,
        default="in-prompt",
        help="in-prompt: the question is part of the compressed prompt (query-aware); after-compression: "
        "the context is compressed first, then the question is asked (query-agnostic)",
    )
    parser.add_argument(
        "--samples-file", help="run exactly the RULER samples of this JSONL (--write-samples)"
    )
    parser.add_argument(
        "--write-samples", help="write the task's samples (RULER) as JSONL to this file first"
    )
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default="simple",
        help="simple: session hooks (the reference); fast: static buffers and CUDA graphs (default simple)",
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peer", choices=sorted(PRESSES), help="also run a peer library's presses")
    parser.add_argument("--peer-python", help="the Python interpreter of the peer's environment")
    parser.add_argument("--peer-presses", help="comma-separated (default: all the peer offers)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=run, interrupted=INTERRUPTED)


def run(args: argparse.Namespace) -> None:
    from squeezekv.evaluation import EvalConfig, TaskOptions, run_eval
    from squeezekv.evaluation.peer import PRESSES
    from squeezekv.evaluation.tasks import TASKS

    if args.task not in TASKS:
        raise ValueError(f"unknown task {args.task!r}; choose one of {sorted(TASKS)}")
    device = str(resolve_device(args.device))
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
        ruler_subtasks=names(args.ruler_subtasks) if args.ruler_subtasks else None,
        ruler_lengths=numbers(args.ruler_lengths, int),
        ruler_samples=args.ruler_samples,
        ruler_question=args.ruler_question,
        samples_file=args.samples_file,
        engine=args.engine,
    )
    config = EvalConfig(
        task=args.task,
        model=model_name(args.model),
        budgets=budgets(args.budgets),
        policies=specs(args.policies),
        allocators=specs(args.allocators),
        limit=args.limit,
        dtype=args.dtype,
        options=options,
        peer=args.peer,
        peer_presses=tuple(presses),
        device=device,
        batch_size=args.batch_size,
        peer_python=args.peer_python,
        kv_bits=numbers(args.kv_bits, int),
        equal_bytes=args.equal_bytes,
        kv_group=args.kv_group,
        quantized_cache=numbers(args.quantized_cache, int) or (),
    )
    if not args.no_progress:  # what the bar will count, before the model loads
        print(f"grid: {describe(config)} per sample", file=sys.stderr)
    tokenizer, model = load_model(config.model, device, args.dtype)
    if args.write_samples:
        from squeezekv.evaluation.tasks import task_named
        from squeezekv.evaluation.tasks.ruler import write_samples

        if args.task != "ruler":
            raise ValueError(f"--write-samples writes RULER samples, not {args.task!r} ones")
        path = write_samples(task_named("ruler", options).samples(tokenizer, model), args.write_samples)
        print(f"samples written: {path}", file=sys.stderr)
    summary = run_eval(config, model, tokenizer, args.out, progress=not args.no_progress)
    print(summary.read_text(encoding="utf-8"))


def counted(count: int, one: str, many: str | None = None) -> str:
    """``1 policy``, ``2 policies``."""
    return f"{count} {one if count == 1 else many or one + 's'}"


def describe(config) -> str:
    """The grid's size in words: ``9 cells (the full cache, 2 policies × 2 allocators × 2 budgets)``."""
    budgets = counted(len(config.budgets), "budget")
    parts = [
        f"{counted(len(config.policies), 'policy', 'policies')} × "
        f"{counted(len(config.allocators), 'allocator')} × {budgets}"
    ]
    if config.kv_bits != (16,):
        parts[0] += f" at {len(config.kv_bits)} precisions (fewer where an allocator plans bits)"
    if config.peer_presses:
        presses = counted(len(config.peer_presses), f"{config.peer} press", f"{config.peer} presses")
        parts.append(f"{presses} × {budgets}")
    if config.quantized_cache:
        parts.append(counted(len(config.quantized_cache), "transformers QuantizedCache cell"))
    return f"{len(config.cells())} cells (the full cache, {', '.join(parts)})"
