"""What every subcommand shares: its model arguments, loading the model and text, progress.

Every subcommand checks all of its arguments first and loads the model last, so bad input
costs no model load; :class:`CliError` is printed as one line with exit status 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from sw_hooks.analysis.options import PROMPT_TOKENS  # noqa: F401 (the subcommands' one value)
from sw_hooks.core.devices import execution_device

MIN_TOKENS = 2


class CliError(Exception):
    """A problem with the user's input: printed as one line, exit status 2."""


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The positional MODEL, ``--gguf`` (a file inside it) and :func:`add_run_arguments`."""
    parser.add_argument(
        "model",
        nargs="?",
        default=None,
        help="Hugging Face id, local directory or .gguf file (default: embedded SmolLM2-135M)",
    )
    parser.add_argument("--gguf", default=None, help="GGUF file name inside a MODEL directory")
    add_run_arguments(parser)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The text measured, how much of it, progress and the GGUF cache: every subcommand's."""
    parser.add_argument(
        "--text",
        type=Path,
        default=None,
        help="calibration/evaluation text file (default: Python's bundled pydoc text)",
    )
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=1024,
        help="tokens of the text used for perplexity (default: 1024)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    parser.add_argument(
        "--no-cache",
        action="store_true",
        help="convert a GGUF model afresh instead of reading its cached copy "
        "(SW_HOOKS_NO_CACHE=1 does the same; SW_HOOKS_CACHE_DIR moves the cache)",
    )
    add_placement_arguments(parser)


def add_placement_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the model loads and in which dtype (:mod:`sw_hooks.placement`)."""
    from sw_hooks.placement import DEVICE_CHOICES, DEVICE_MAPS, DTYPE_CHOICES

    parser.add_argument(
        "--device",
        default="auto",
        help=f"{', '.join(DEVICE_CHOICES)}; auto: CUDA, else MPS, else the CPU (default: auto)",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPE_CHOICES,
        help="auto: the checkpoint's own (float32 for GGUF, which dequantizes in float32); "
        "the loss and the recorded maxima are computed in float32 whatever it is (default: auto)",
    )
    parser.add_argument(
        "--device-map",
        default=None,
        choices=DEVICE_MAPS,
        help="spread the model over GPUs, CPU and disk with accelerate instead of one --device",
    )
    parser.add_argument(
        "--offload-folder",
        type=Path,
        default=None,
        help="where --device-map may put weights that fit nowhere else",
    )


def check_placement_arguments(args: argparse.Namespace) -> None:
    """Refuse a device this machine lacks, or options that contradict, before any loading."""
    from sw_hooks.cli._paths import check_output_folder
    from sw_hooks.placement import placement

    try:
        placement(args.device, args.dtype, args.device_map, args.offload_folder)
    except ValueError as error:
        raise CliError(first_line(error)) from None
    if args.offload_folder is not None:
        check_output_folder(args.offload_folder, "--offload-folder", ())


def check_model_arguments(args: argparse.Namespace) -> None:
    """Check the arguments of :func:`add_model_arguments` that need no file read."""
    if args.max_tokens < MIN_TOKENS:
        raise CliError(f"--max-tokens must be at least {MIN_TOKENS}, got {args.max_tokens}")
    if args.gguf is not None and args.model is None:
        raise CliError("--gguf names a file inside a MODEL folder; give that folder as MODEL")
    check_placement_arguments(args)


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
    from sw_hooks.models import DEFAULT_MODEL, check_model_spec, load_model

    name = args.model or DEFAULT_MODEL
    try:
        check_model_spec(args.model, gguf_file=args.gguf)
        if args.quiet:
            _hide_transformers_progress()
        with step(f"loading {name}", quiet=args.quiet):
            model, tokenizer = load_model(
                args.model,
                gguf_file=args.gguf,
                device=args.device,
                dtype=args.dtype,
                device_map=args.device_map,
                offload_folder=args.offload_folder,
                cache=not args.no_cache,
            )
    except (ValueError, TypeError, OSError) as error:
        raise CliError(first_line(error)) from None
    progress(f"{name}: {_dtype_name(model)} on {execution_device(model)}", quiet=args.quiet)
    return model, tokenizer, name


def _dtype_name(model: torch.nn.Module) -> str:
    dtype = getattr(model, "dtype", None)
    return str(dtype).removeprefix("torch.") if dtype is not None else "unknown dtype"


def with_model(args: argparse.Namespace, spec: str | None) -> argparse.Namespace:
    """``args`` for loading another model (``compare``'s, ``report --candidate``'s) in the same way."""
    return argparse.Namespace(**{**vars(args), "model": spec, "gguf": None})


def _hide_transformers_progress() -> None:
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def read_text(path: Path | None, max_chars: int = 200_000) -> str:
    """The calibration text: the file given, or the text bundled with Python."""
    from sw_hooks.models import calibration_text

    if path is None:
        return calibration_text()[:max_chars]
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CliError(f"no such text file: {path}") from None
    except (UnicodeDecodeError, OSError) as error:
        raise CliError(f"cannot read text file {path}: {type(error).__name__}") from None
    if not text.strip():
        raise CliError(f"text file {path} is empty")
    return text[:max_chars]


def text_name(path: Path | None) -> str:
    """The calibration text's name for a result: the file given, or the bundled text."""
    return str(path) if path is not None else "pydoc_data.topics"


def token_ids(
    tokenizer: Any, text: str, max_tokens: int, *, prepend_bos: bool = False
) -> torch.Tensor:
    from sw_hooks.models import tokenize

    try:
        return tokenize(tokenizer, text, max_tokens=max_tokens, prepend_bos=prepend_bos)
    except ValueError as error:
        raise CliError(str(error)) from None


def first_line(error: BaseException) -> str:
    """An exception's message as one line (its type name when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
