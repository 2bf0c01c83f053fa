"""What every subcommand shares: loading the model and text, progress, clear errors."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


class CliError(Exception):
    """A problem with the user's input: printed as one line, exit status 2."""


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None,
                        help="Hugging Face id, local directory or .gguf file (default: embedded SmolLM2-135M)")
    parser.add_argument("--gguf", default=None, help="GGUF file name inside a MODEL directory")
    parser.add_argument("--text", type=Path, default=None,
                        help="calibration/evaluation text file (default: Python's bundled pydoc text)")
    parser.add_argument("--max-tokens", type=int, default=1024,
                        help="tokens of the text used for perplexity (default: 1024)")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")


def progress(message: str, *, quiet: bool = False) -> None:
    if not quiet:
        print(f"[sw-hooks] {message}", file=sys.stderr, flush=True)


@contextmanager
def step(message: str, *, quiet: bool = False) -> Iterator[None]:
    """Print a slow step's name, then how long it took."""
    start = time.perf_counter()
    progress(f"{message} ...", quiet=quiet)
    yield
    progress(f"{message}: done in {time.perf_counter() - start:.1f} s", quiet=quiet)


def load_model_for_cli(args: argparse.Namespace) -> tuple[torch.nn.Module, Any, str]:
    """``(model, tokenizer, display name)``, turning loading errors into :class:`CliError`."""
    from sw_hooks.models import DEFAULT_MODEL, load_model

    name = args.model or DEFAULT_MODEL
    try:
        with step(f"loading {name}", quiet=args.quiet):
            model, tokenizer = load_model(args.model, gguf_file=args.gguf)
    except (FileNotFoundError, ValueError, TypeError, OSError) as error:
        raise CliError(str(error).splitlines()[0]) from None
    return model, tokenizer, name


def read_text(path: Path | None, max_chars: int = 200_000) -> str:
    """The calibration text: the file given, or the text bundled with Python."""
    from sw_hooks.models import calibration_text

    if path is None:
        return calibration_text()[:max_chars]
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CliError(f"no such text file: {path}") from None
    except (UnicodeDecodeError, IsADirectoryError, PermissionError) as error:
        raise CliError(f"cannot read text file {path}: {type(error).__name__}") from None
    if not text.strip():
        raise CliError(f"text file {path} is empty")
    return text[:max_chars]


def token_ids(tokenizer: Any, text: str, max_tokens: int, *, prepend_bos: bool = False) -> torch.Tensor:
    from sw_hooks.models import tokenize

    if max_tokens < 2:
        raise CliError(f"--max-tokens must be at least 2, got {max_tokens}")
    try:
        return tokenize(tokenizer, text, max_tokens=max_tokens, prepend_bos=prepend_bos)
    except ValueError as error:
        raise CliError(str(error)) from None
