"""The ``sw-hooks`` command: ``detect``, ``quantize``, ``report``, ``compare``, ``export`` and
``quantizer-config`` subcommands.

Each subcommand lives in its own module with ``register(subparsers)``, checks all of its
arguments before it loads a model, and leaves the work to the library. Every error of the
user's input, whether argparse, the subcommand or the library finds it (a ``ValueError`` or
``TypeError``, such as a model without down-projections), is one line on stderr and exit
status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import NoReturn

from sw_hooks.cli._common import CliError, first_line
from sw_hooks.cli._noise import silence_known_import_noise

SUBCOMMANDS = ("detect", "quantize", "report", "compare", "export", "quantizer_config")
USAGE_ERROR = 2


class OneLineErrorParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line, like every other error here."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="sw-hooks", description="Find, verify and handle super weights in transformer models."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
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
    silence_known_import_noise()
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (CliError, ValueError, TypeError) as error:
        print(f"sw-hooks {args.command}: error: {first_line(error)}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print(f"sw-hooks {args.command}: interrupted", file=sys.stderr)
        return 130
