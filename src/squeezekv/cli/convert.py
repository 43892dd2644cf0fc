"""``squeezekv convert``: a model the way users have it (a GGUF file, say) as a safetensors folder."""

from __future__ import annotations

import argparse

from squeezekv.loading import convert


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "convert", help="write a model (a .gguf file or a folder holding one) as a safetensors folder"
    )
    parser.add_argument("source", help="a .gguf file, a folder holding one, or a Hugging Face folder")
    parser.add_argument("out", help="the folder to write (must not exist, or be empty)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    print(f"written: {convert(args.source, args.out, args.dtype)}")
