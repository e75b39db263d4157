"""`diffusion-oft` command line: thin argument parsing; every command's logic lives in the library.

Each subcommand is a module in ``diffusion_oft.commands`` with ``register(subparsers)``, which adds
its parser and sets ``func`` (called with the parsed args; returns an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .commands import CommandError

__all__ = ["COMMAND_MODULES", "CommandError", "build_parser", "main"]

COMMAND_MODULES = ("demo", "info", "generate", "train", "convert", "eval")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffusion-oft",
        description="Orthogonal finetuning (OFT, BOFT, ETHER, ETHER+, HRA) adapters for diffusers models.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"diffusion_oft.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .console import setup_console

    setup_console()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from ._version import __version__

        print(__version__)
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (CommandError, FileNotFoundError, ValueError) as err:
        print(f"diffusion-oft {args.command}: error: {err}", file=sys.stderr)
        return 2
