"""``sw-hooks report``: detection, impact and a small quantization sweep, as a report with figures."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sw_hooks.analysis.report_data import REPORT_BLOCK_SIZES, REPORT_CLIP
from sw_hooks.cli._common import (
    CliError,
    add_model_arguments,
    check_model_arguments,
    first_line,
    load_model_for_cli,
    progress,
    read_text,
    step,
    token_ids,
    with_model,
)
from sw_hooks.cli._paths import check_output_folder
from sw_hooks.cli._super_weights import add_super_weights_arguments, read_detection
from sw_hooks.quant.config import QuantConfig, quant_grid

DEFAULTS = QuantConfig()

REPORT_TOKENS = 512


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report",
        help="write a report with figures: spikes, residual stream, weights, impact, quantization",
        description=(
            "Detect and verify the super weights (or read them from --super-weights FILE), "
            "measure the paper's Table 1 and a small "
            "quantization sweep, and write DIR/report.md with the figures as PNGs beside it, "
            "DIR/report.html (one self-contained file, figures inside) and DIR/report.json "
            "with every number shown. A model other than a causal LM (an encoder, a "
            "seq2seq model) is verified with its own loss; Table 1 and the sweep, which "
            "measure perplexity, are left out for it."
        ),
    )
    add_model_arguments(parser)
    parser.set_defaults(max_tokens=REPORT_TOKENS)
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        help="folder to write the report into (created if missing)",
    )
    parser.add_argument(
        "--block-size",
        type=int,
        action="append",
        default=None,
        help="quantization block size (repeatable; default: "
        f"{', '.join(map(str, REPORT_BLOCK_SIZES))})",
    )
    parser.add_argument(
        "--bits",
        type=int,
        default=DEFAULTS.bits,
        help=f"quantization bits (default: {DEFAULTS.bits})",
    )
    parser.add_argument(
        "--clip",
        default=str(REPORT_CLIP),
        help=f"quantization clipping (default: {REPORT_CLIP})",
    )
    parser.add_argument(
        "--history",
        type=Path,
        default=None,
        help="a CSVLogger metrics.csv from SuperWeightMonitor to plot over training steps",
    )
    parser.add_argument(
        "--candidate",
        default=None,
        help="a changed copy of MODEL (quantized, fine-tuned: folder or .gguf) to compare "
        "with it: super activations, perplexity, KL, and both spike profiles",
    )
    add_super_weights_arguments(parser)
    parser.set_defaults(func=run)


def _options(args: argparse.Namespace):  # -> ReportOptions (imported lazily)
    """The report's options from the flags: one config per block size, checked now."""
    from sw_hooks.analysis.report_data import ReportOptions

    sizes = tuple(args.block_size or REPORT_BLOCK_SIZES)
    if any(size <= 0 for size in sizes):
        raise CliError(f"--block-size must be positive, got {list(sizes)}")
    try:
        return ReportOptions(
            quantization=quant_grid([args.bits], sizes, [args.clip]), candidates=args.candidates
        )
    except ValueError as error:
        raise CliError(str(error)) from None


def _history(path: Path | None) -> list[dict[str, float]]:
    if path is None:
        return []
    from sw_hooks.outputs.plots import read_history

    try:
        return read_history(path)
    except (OSError, ValueError) as error:
        raise CliError(f"cannot read --history {path}: {error}") from None


def _check_plots_installed() -> None:
    """The figures are drawn last: refuse at once when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CliError(
            'the report draws figures with matplotlib: pip install "sw_hooks[plots]"'
        ) from None


def _report_files() -> tuple[str, ...]:
    from sw_hooks.outputs.report import FIGURES

    return ("report.md", "report.html", "report.json", *FIGURES)


def _check_candidate(spec: str | None) -> None:
    """The candidate's path is looked at before any model loads."""
    if spec is None:
        return
    from sw_hooks.models import check_model_spec

    try:
        check_model_spec(spec)
    except (ValueError, TypeError, OSError) as error:
        raise CliError(f"--candidate: {first_line(error)}") from None


def _load_candidate(args: argparse.Namespace) -> tuple[Any, str | None]:
    if args.candidate is None:
        return None, None
    candidate, _, name = load_model_for_cli(with_model(args, args.candidate))
    return candidate, name


def run(args: argparse.Namespace) -> int:
    from sw_hooks.analysis.report import collect_report
    from sw_hooks.outputs.report import write_report

    options = _options(args)
    check_model_arguments(args)
    check_output_folder(args.out, "--out", _report_files())
    _check_plots_installed()
    history = _history(args.history)
    given = read_detection(args)
    text = read_text(args.text)
    _check_candidate(args.candidate)
    model, tokenizer, name = load_model_for_cli(args)
    candidate, candidate_name = _load_candidate(args)
    ids = token_ids(tokenizer, text, args.max_tokens)
    data = collect_report(
        model,
        tokenizer,
        ids,
        model_name=name,
        options=options,
        progress=lambda line: progress(line, quiet=args.quiet),
        candidate=candidate,
        candidate_name=candidate_name,
        detection=given,
    )
    data.history = history
    with step("writing figures", quiet=args.quiet):
        try:
            path = write_report(data, args.out)
        except OSError as error:
            raise CliError(f"cannot write the report into {args.out}: {error}") from None
    print(path)
    return 0
