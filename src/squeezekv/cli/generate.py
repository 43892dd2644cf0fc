"""``squeezekv generate``: one prompt through a compressed cache, and a report of what it kept."""

from __future__ import annotations

import argparse
import json

from squeezekv.cli.common import (
    add_compression_arguments,
    add_model_arguments,
    config_from,
    read_prompt,
)
from squeezekv.loading import load_model, resolve_device


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "generate", help="generate with a compressed KV cache and report what it kept"
    )
    add_model_arguments(parser)
    parser.add_argument("--prompt-file", required=True, help="UTF-8 text file holding the prompt")
    add_compression_arguments(parser)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


class TokenProgress:
    """A ``model.generate`` streamer that advances a tqdm bar (on stderr) by each new token.

    The bar appears when generation starts, so a setting refused before that prints only its error.
    """

    def __init__(self, total: int, disable: bool) -> None:
        self.total, self.disable = total, disable
        self.bar = None

    def put(self, value) -> None:
        from tqdm import tqdm

        if self.bar is None:  # the first call carries the prompt
            self.bar = tqdm(total=self.total, unit="token", desc="generating", disable=self.disable)
        else:
            self.bar.update(1)

    def end(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run(args: argparse.Namespace) -> None:
    import squeezekv

    config = config_from(args)
    text = read_prompt(args.prompt_file)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} must be >= 1")
    tokenizer, model = load_model(args.model, resolve_device(args.device), args.dtype)
    input_ids = tokenizer(text, return_tensors="pt").input_ids.to(model.device)
    progress = TokenProgress(args.max_new_tokens, disable=args.no_progress)
    try:
        result = squeezekv.generate(
            model,
            input_ids,
            config,
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
            streamer=progress,
        )
    finally:
        progress.end()
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
        f"allocator: {stats.config['allocator']}   budget: {stats.config['budget']}"
        + (f"   kv bits: {stats.config['kv_bits']}" if "kv_bits" in stats.config else ""),
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
