"""The ``squeezekv`` command line: one module per command, shared helpers in ``common``."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("generate", "eval", "profile", "bench", "convert", "serve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="squeezekv", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"squeezekv.cli.{name}").add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs one command; expected errors and Ctrl-C end in one line on stderr, not a traceback."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.argv = argv  # what a relaunch under torchrun repeats
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"squeezekv: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"squeezekv: {getattr(args, 'interrupted', 'interrupted')}", file=sys.stderr)
        return 130
    return 0
