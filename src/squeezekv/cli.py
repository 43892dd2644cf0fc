"""The ``squeezekv`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

BUDGET_HELP = "a fraction of the prompt in (0, 1] (e.g. 0.2), or whole tokens per layer (e.g. 512)"


def parse_budget(text: str) -> float | int:
    """``"0.2"`` is a fraction, ``"512"`` a token count (an integer literal means tokens)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"budget {text!r} is not a number: {BUDGET_HELP}") from None


def add_compression_arguments(parser: argparse.ArgumentParser) -> None:
    from squeezekv import ALLOCATORS, POLICIES

    parser.add_argument("--budget", type=parse_budget, required=True, help=BUDGET_HELP)
    parser.add_argument("--policy", default="h2o", help=f"one of {', '.join(sorted(POLICIES))} (default h2o)")
    parser.add_argument(
        "--allocator", default="squeeze", help=f"one of {', '.join(sorted(ALLOCATORS))} (default squeeze)"
    )
    parser.add_argument("--p", type=float, help="squeeze allocator: the squeezed group's share of the budget")
    parser.add_argument("--groups", type=int, help="squeeze allocator: similarity clusters")
    parser.add_argument("--sinks", type=int, help="streaming policy: sink tokens")
    parser.add_argument("--recent-ratio", type=float, help="h2o policy: recent share of a budget")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", help="a local model directory or hub name (default: the bundled reference model)"
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])


def load_model(name: str | None, device: str, dtype: str):
    """Tokenizer and model, or a one-line error for a path that is not there."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()

    if name is None:
        from squeezekv.reference import reference_model_path

        name = str(reference_model_path())
    looks_local = name.startswith((".", "/", "~")) or Path(name).exists() or name.count("/") != 1
    if looks_local and not Path(name).expanduser().is_dir():
        raise FileNotFoundError(f"model path {name!r} does not exist")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto" and device == "cpu":
        dtype = "float32"  # bf16 weights run far slower than float32 on a CPU
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype, attn_implementation="sdpa")
    except OSError as error:
        raise FileNotFoundError(f"cannot load model {name!r}: {str(error).splitlines()[0]}") from None
    return tokenizer, model.to(device).eval()


def from_arguments(cls, args: argparse.Namespace):
    """Builds a configuration dataclass from the parsed options that share its field names."""
    return cls(
        **{field.name: getattr(args, field.name) for field in fields(cls) if hasattr(args, field.name)}
    )


def config_from(args: argparse.Namespace):
    from squeezekv import SqueezeConfig

    names = ("p", "groups", "sinks", "recent_ratio")
    settings = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    return SqueezeConfig.build(budget=args.budget, policy=args.policy, allocator=args.allocator, **settings)


def run_generate(args: argparse.Namespace) -> None:
    import squeezekv

    config = config_from(args)
    prompt_path = Path(args.prompt_file)
    if not prompt_path.is_file():
        raise FileNotFoundError(f"prompt file {str(prompt_path)!r} does not exist")
    text = prompt_path.read_text(encoding="utf-8")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} must be >= 1")
    tokenizer, model = load_model(args.model, args.device, args.dtype)
    input_ids = tokenizer(text, return_tensors="pt").input_ids.to(model.device)
    result = squeezekv.generate(
        model,
        input_ids,
        config,
        max_new_tokens=args.max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.eos_token_id,
    )
    continuation = tokenizer.decode(result.sequences[0, input_ids.shape[1] :], skip_special_tokens=True)
    stats = result.stats
    if args.json:
        print(json.dumps({"continuation": continuation, **stats.to_dict()}))
        return
    print(continuation)
    print()
    print(report(stats))


def report(stats) -> str:
    """A short human-readable summary of one generation's compression."""
    lines = [
        f"prompt tokens: {stats.prompt_tokens[0]}   policy: {stats.config['policy']}   "
        f"allocator: {stats.config['allocator']}   budget: {stats.config['budget']}",
        f"{'layer':>5}  {'similarity':>10}  {'budget':>6}  {'held':>6}",
    ]
    for layer, (similarity, budget, held) in enumerate(
        zip(
            stats.layer_similarity[0].tolist(),
            stats.layer_budget[0].tolist(),
            stats.layer_tokens_held[0].tolist(),
            strict=True,
        )
    ):
        lines.append(f"{layer:>5}  {similarity:>10.4f}  {budget:>6}  {held:>6}")
    lines.append(
        f"KV cache kept: {stats.kv_bytes_kept / 2**20:.2f} MiB of {stats.kv_bytes_full / 2**20:.2f} MiB "
        f"({100 * stats.kv_fraction_kept:.1f}%)   prefill {stats.prefill_seconds:.3f} s   "
        f"decode {stats.decode_seconds:.3f} s for {stats.decode_steps} steps"
    )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="squeezekv", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser(
        "generate", help="generate with a compressed KV cache and report what it kept"
    )
    add_model_arguments(generate)
    generate.add_argument("--prompt-file", required=True, help="UTF-8 text file holding the prompt")
    add_compression_arguments(generate)
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    generate.set_defaults(run=run_generate)
    from squeezekv.evaluation.commands import add_eval, add_profile

    add_eval(commands)
    add_profile(commands)
    from squeezekv import bench

    parser_of_bench = commands.add_parser(
        "bench", help="throughput and memory against the full cache and transformers"
    )
    bench.add_arguments(parser_of_bench)
    parser_of_bench.set_defaults(run=bench.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.argv = argv  # what a relaunch under torchrun repeats
    try:
        args.run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"squeezekv: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
