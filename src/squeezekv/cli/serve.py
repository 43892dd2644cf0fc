"""``squeezekv serve``: an OpenAI-compatible HTTP server with compressed KV caches and continuous batching."""

from __future__ import annotations

import argparse
import re

from squeezekv.cli.common import add_compression_arguments, add_model_arguments, config_from, model_name
from squeezekv.loading import load_model, resolve_device

UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_bytes(text: str) -> int:
    """``"512MiB"``, ``"2GiB"``, ``"2G"`` or a plain byte count."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if match is None or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive size like 512MiB, 2GiB or 1000000")
    return int(float(match.group(1)) * UNITS[match.group(2)])


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "serve", help="serve the model over an OpenAI-compatible HTTP API (needs squeezekv[serve])"
    )
    add_model_arguments(parser)
    add_compression_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--kv-memory",
        type=parse_bytes,
        default="256MiB",
        help="KV cache memory shared by the requests in flight, e.g. 256MiB or 40GiB (default 256MiB)",
    )
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default 16)")
    parser.add_argument(
        "--max-queue",
        type=int,
        default=64,
        help="requests that may wait for memory; more get 503 (default 64)",
    )
    parser.add_argument(
        "--prefill-chunk",
        type=int,
        help="prefill prompts this many tokens at a time between decode steps (default: whole prompts, "
        "whose answers equal squeezekv.generate's)",
    )
    parser.add_argument(
        "--max-tokens", type=int, default=16, help="a request's default max_tokens (default 16)"
    )
    parser.add_argument(
        "--served-model-name", help="the model's name in the API (default: the folder's name)"
    )
    parser.set_defaults(run=run)


def build_server(args: argparse.Namespace):
    """The :class:`~squeezekv.serving.app.Server` the options describe (model loaded)."""
    try:
        from squeezekv.serving.app import Server
    except ImportError as error:
        raise ValueError(str(error)) from None
    from pathlib import Path

    from squeezekv.serving import ServingEngine

    config = config_from(args)
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens {args.max_tokens} must be >= 1")
    tokenizer, model = load_model(args.model, resolve_device(args.device), args.dtype)
    engine = ServingEngine(
        model,
        config,
        kv_memory=args.kv_memory,
        block_size=args.block_size,
        max_waiting=args.max_queue,
        prefill_chunk=args.prefill_chunk,
    )
    name = args.served_model_name or Path(model_name(args.model)).name
    return Server(engine, tokenizer, name, default_max_tokens=args.max_tokens)


def run(args: argparse.Namespace) -> None:
    server = build_server(args)
    import uvicorn

    from squeezekv.serving.app import create_app

    print(f"squeezekv: serving {server.model_name!r} at http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(create_app(server), host=args.host, port=args.port, log_level="warning")
