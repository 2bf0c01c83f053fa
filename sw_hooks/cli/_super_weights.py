"""Where every subcommand gets its super weights: one option, one reader, one selection rule.

``--super-weights FILE`` names a ``sw-hooks detect --json`` result: it is read with
:meth:`~sw_hooks.core.results.DetectionResult.load` and nothing is detected again. Without
it the command detects on its own model, the way ``detect`` does (spikes on the first
:data:`~sw_hooks.analysis.options.PROMPT_TOKENS` tokens, verification on all of them).
Either way :meth:`~sw_hooks.core.results.DetectionResult.select` picks the weights: the
verified super weights, or every candidate with ``--candidates`` (detection then skips
verification, which only sorts candidates into super weights).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sw_hooks.analysis.options import PROMPT_TOKENS
from sw_hooks.cli._common import CliError, first_line, progress, step
from sw_hooks.core.results import DetectionResult, SuperWeight


def add_super_weights_arguments(parser: argparse.ArgumentParser, group: Any = None) -> None:
    """``--super-weights FILE`` and ``--candidates``, the same on every subcommand
    (``--super-weights`` inside ``group`` when it excludes another option)."""
    (group or parser).add_argument(
        "--super-weights",
        type=Path,
        default=None,
        metavar="FILE",
        help="a detection result (`sw-hooks detect --json`) to take the super weights from "
        "instead of detecting them on the model",
    )
    parser.add_argument(
        "--candidates",
        action="store_true",
        help="use every candidate of the detection, not only the verified super weights",
    )


def read_detection(args: argparse.Namespace) -> DetectionResult | None:
    """The detection result of ``--super-weights`` (``None`` when none was given), read and
    its selection checked before any model loads, so that a bad file costs nothing."""
    path = args.super_weights
    if path is None:
        return None
    try:
        result = DetectionResult.load(path)
    except (OSError, ValueError) as error:
        message = first_line(error).removeprefix(f"{path}: ")
        raise CliError(f"cannot read {path}: {message}") from None
    weights = _select(result, args)
    which = "candidate(s)" if args.candidates else "verified super weight(s)"
    progress(
        f"super weights: read from {path}, {len(weights)} {which}; not detecting again",
        quiet=args.quiet,
    )
    return result


def detect_on(
    model: Any, ids: Any, *, candidates: bool, quiet: bool, name: str | None = None
) -> DetectionResult:
    """Detection as ``sw-hooks detect`` runs it: spikes on the first :data:`PROMPT_TOKENS`
    tokens of ``ids``, each candidate verified on all of them (unless only candidates
    are wanted)."""
    from sw_hooks.analysis.detect import run_detection

    with step("detecting super weights", quiet=quiet):
        return run_detection(
            model,
            ids[:, :PROMPT_TOKENS],
            calibration=ids,
            verify_impact=not candidates,
            model_name=name,
            progress=lambda line: progress(line, quiet=quiet),
        )


def selected(result: DetectionResult, args: argparse.Namespace) -> list[SuperWeight]:
    """The one selection rule applied to ``result`` (``--candidates`` or not)."""
    return list(_select(result, args))


def _select(result: DetectionResult, args: argparse.Namespace) -> tuple[SuperWeight, ...]:
    try:
        return result.select(candidates=args.candidates)
    except ValueError as error:
        raise CliError(first_line(error)) from None
