"""The ``sw-hooks`` command: ``detect``, ``quantize`` and ``report`` subcommands.

Each subcommand lives in its own module with ``register(subparsers)``; bad input exits
with status 2 and one clear line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sw_hooks.cli._common import CliError

SUBCOMMANDS = ("detect", "quantize", "report")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sw-hooks", description="Find, verify and handle super weights in transformer models."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    import importlib

    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"sw_hooks.cli.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"sw_hooks.cli.{name}":
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CliError as error:
        print(f"sw-hooks {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sw-hooks {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
