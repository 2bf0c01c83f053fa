"""``sw-hooks quantize``: perplexity after block RTN, with and without super-weight holdout."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from torch import nn

from sw_hooks.cli._common import (
    CliError,
    add_model_arguments,
    check_model_arguments,
    load_model_for_cli,
    progress,
    read_text,
    step,
    token_ids,
)
from sw_hooks.cli._paths import check_output_file, write_output
from sw_hooks.cli._super_weights import (
    add_super_weights_arguments,
    detect_on,
    read_detection,
    selected,
)
from sw_hooks.core.access import Coordinate
from sw_hooks.core.results import DetectionResult
from sw_hooks.quant.config import QuantConfig, quant_grid

DEFAULTS = QuantConfig()
QUANTIZE_SCHEMA_VERSION = 1
"""``quantize --json``: the held-out weights as ``{module, row, col, expert}`` objects."""
_INDEX = re.compile(r"-?\d+")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "quantize",
        help="perplexity after blockwise RTN, with and without the super weights held out",
        description=(
            "Fake-quantize every linear weight but the embeddings and the LM head (and every "
            "expert's weights, one expert at a time), for each bits x block size x clip "
            "setting, with and without the super weights held out in full precision, and print "
            "the perplexity beside the unquantized baseline."
        ),
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--bits",
        type=int,
        action="append",
        default=None,
        help=f"bits per weight, 2 to 8 (repeatable; default: {DEFAULTS.bits})",
    )
    parser.add_argument(
        "--block-size",
        type=int,
        action="append",
        default=None,
        help=f"elements per 1-D block (repeatable; default: {DEFAULTS.block_size})",
    )
    parser.add_argument(
        "--clip",
        action="append",
        default=None,
        help="outlier clipping: none, zscore:Z, top:F, top-tensor:F, iqr:K "
        f"(repeatable; default: {DEFAULTS.clip or 'none'})",
    )
    given = parser.add_mutually_exclusive_group()
    given.add_argument(
        "--holdout",
        action="append",
        default=None,
        metavar="MODULE:ROW:COL",
        help="a super weight to hold out, MODULE:ROW:COL or, inside fused experts, "
        "MODULE:EXPERT:ROW:COL (repeatable); default: detect them",
    )
    add_super_weights_arguments(parser, given)
    parser.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    parser.set_defaults(func=run)


def _configs(args: argparse.Namespace) -> tuple[QuantConfig, ...]:
    """Every (bits, block size, clip) config, all checked before the model loads.

    Unset flags take :class:`QuantConfig`'s own defaults.
    """
    sizes = args.block_size or [DEFAULTS.block_size]
    for size in sizes:
        if size <= 0:
            raise CliError(f"--block-size must be a positive integer, got {size}")
    try:
        return quant_grid(args.bits or [DEFAULTS.bits], sizes, args.clip or [DEFAULTS.clip])
    except ValueError as error:
        raise CliError(str(error)) from None


def _parse_holdout(specs: list[str]) -> list[Coordinate]:
    return [_parse_coordinate(spec) for spec in specs]


def _parse_coordinate(spec: str) -> Coordinate:
    """``MODULE:ROW:COL`` or ``MODULE:EXPERT:ROW:COL`` (module names hold no colon)."""
    module, *indices = spec.split(":")
    if not module or len(indices) not in (2, 3) or not all(map(_INDEX.fullmatch, indices)):
        raise CliError(f"--holdout takes MODULE:ROW:COL or MODULE:EXPERT:ROW:COL, got {spec!r}")
    try:
        return Coordinate.of((module, *map(int, indices)))
    except ValueError as error:
        raise CliError(f"--holdout {spec}: {error}") from None


def _held_out(
    args: argparse.Namespace, given: DetectionResult | None, model: nn.Module, ids: Any
) -> list[Any]:
    """The weights the detection result selects (read from ``--super-weights`` or detected
    now)."""
    result = given or detect_on(model, ids, candidates=args.candidates, quiet=args.quiet)
    return selected(result, args)


def _coordinate_dict(weight: Any) -> dict[str, Any]:
    coordinate = Coordinate.of(weight)
    return {
        "module": coordinate.module,
        "row": coordinate.row,
        "col": coordinate.col,
        "expert": coordinate.expert,
    }


def _name(coordinate: Coordinate) -> str:
    """``module[row, col]``, or ``module[expert E][row, col]`` inside fused experts."""
    expert = "" if coordinate.expert is None else f"[expert {coordinate.expert}]"
    return f"{coordinate.module}{expert}[{coordinate.row}, {coordinate.col}]"


def _describe(weights: list[Any], shown: int = 4) -> str:
    names = [_name(Coordinate.of(weight)) for weight in weights]
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return (", ".join(names[:shown]) + more) or "none"


def _table(baseline: float, runs: list[dict[str, Any]]) -> str:
    lines = [
        f"baseline (unquantized) perplexity: {baseline:.2f}",
        "",
        f"{'bits':>4}  {'block':>7}  {'clip':<12}  {'no holdout':>12}  {'holdout':>12}",
    ]
    pairs: dict[tuple, dict[bool, float]] = {}
    for run in runs:
        key = (run["bits"], run["block_size"], run["clip"])
        pairs.setdefault(key, {})[run["holdout"]] = run["perplexity"]
    for (bits, size, clip), result in pairs.items():
        lines.append(
            f"{bits:>4}  {size:>7}  {clip:<12}  {result[False]:>12.2f}  {result[True]:>12.2f}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from sw_hooks.analysis.impact import perplexity
    from sw_hooks.quant.sweep import holdout_sweep
    from sw_hooks.quant.targets import resolve_holdout

    configs = _configs(args)
    check_model_arguments(args)
    check_output_file(args.json, "--json")
    if args.holdout and args.candidates:
        raise CliError("--candidates chooses among detected weights; --holdout names them")
    holdout = _parse_holdout(args.holdout) if args.holdout else None  # checked before loading
    given = read_detection(args)
    text = read_text(args.text)
    model, tokenizer, name = load_model_for_cli(args)
    ids = token_ids(tokenizer, text, args.max_tokens)
    weights = holdout if holdout is not None else _held_out(args, given, model, ids)
    resolve_holdout(model, weights)
    progress(f"holding out: {_describe(weights)}", quiet=args.quiet)
    with step("baseline perplexity", quiet=args.quiet):
        baseline = perplexity(model, ids)
    with step(f"quantization sweep: {2 * len(configs)} runs", quiet=args.quiet):
        sweep = holdout_sweep(
            model,
            configs,
            weights,
            lambda: perplexity(model, ids),
            progress=lambda line: progress(line, quiet=args.quiet),
        )
    runs = [run.to_dict() for run in sweep]
    print(f"model: {name}; {ids.shape[1]} tokens; held out: {_describe(weights)}")
    print(_table(baseline, runs))
    if args.json is not None:
        payload = {
            "schema_version": QUANTIZE_SCHEMA_VERSION,
            "model": name,
            "tokens": int(ids.shape[1]),
            "super_weights": [_coordinate_dict(w) for w in weights],
            "baseline_perplexity": baseline,
            "runs": runs,
        }
        write_output(args.json, json.dumps(payload, indent=2) + "\n")
    return 0
