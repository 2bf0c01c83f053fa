"""``sw-hooks export``: a quantized GGUF file whose super-weight tensors keep their precision."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sw_hooks.cli._common import (
    MIN_TOKENS,
    CliError,
    add_run_arguments,
    check_placement_arguments,
    first_line,
    load_model_for_cli,
    progress,
    read_text,
    step,
    token_ids,
)
from sw_hooks.cli._paths import check_output_file
from sw_hooks.cli._super_weights import (
    add_super_weights_arguments,
    detect_on,
    read_detection,
    selected,
)
from sw_hooks.export.gguf import KEEP_TYPES, QUANT_TYPES, GgufExport, check_export, export_gguf

NO_KEEP = "none"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a quantized GGUF file that keeps the super-weight tensors",
        description="Quantize a GGUF model's weight matrices with gguf's quantizers, writing "
        "the tensors that hold super weights at f16 or q8_0 (llama.cpp's convention), and "
        "optionally a manifest of their exact values to patch back after loading.",
    )
    parser.add_argument(
        "model",
        nargs="?",
        default=None,
        help="the source .gguf file (default: the embedded SmolLM2-135M)",
    )
    parser.add_argument(
        "--gguf", type=Path, required=True, dest="gguf_out", help="the GGUF file to write"
    )
    parser.add_argument(
        "--type",
        default="Q4_0",
        dest="quant_type",
        help=f"type of the weight matrices: {', '.join(QUANT_TYPES)} (default: Q4_0)",
    )
    parser.add_argument(
        "--keep",
        default="f16",
        help=f"type of the super-weight tensors: {', '.join(KEEP_TYPES)} or {NO_KEEP} "
        "(default: f16)",
    )
    add_super_weights_arguments(parser)
    parser.add_argument(
        "--manifest",
        type=Path,
        default=None,
        help="also write the super weights' exact values here, to apply after loading",
    )
    add_run_arguments(parser)
    # The model is always a file here: no folder, so no file name inside one.
    parser.set_defaults(func=run, gguf=None)


def run(args: argparse.Namespace) -> int:
    source = _source(args.model)
    keep = _keep(args.keep)
    if args.max_tokens < MIN_TOKENS:
        raise CliError(f"--max-tokens must be at least {MIN_TOKENS}, got {args.max_tokens}")
    check_placement_arguments(args)
    check_output_file(args.gguf_out, "--gguf")
    check_output_file(args.manifest, "--manifest")
    given = read_detection(args)
    weights = selected(given, args) if given is not None else None
    text = read_text(args.text)
    check_export(
        source, args.gguf_out, quant_type=args.quant_type, keep=keep, super_weights=weights or ()
    )
    if weights is None or args.manifest is not None:
        model, tokenizer, _ = load_model_for_cli(args)
        if weights is None:
            ids = token_ids(tokenizer, text, args.max_tokens)
            result = detect_on(model, ids, candidates=args.candidates, quiet=args.quiet)
            weights = selected(result, args)
            if not weights:
                progress("no super weight: every tensor is quantized", quiet=args.quiet)
        if args.manifest is not None:
            _write_manifest(weights, model, args.manifest, source, quiet=args.quiet)
    with step(f"writing {args.gguf_out}", quiet=args.quiet):
        export = export_gguf(
            source,
            args.gguf_out,
            quant_type=args.quant_type,
            keep=keep,
            super_weights=weights,
            progress=lambda line: progress(line, quiet=args.quiet),
        )
    print(format_summary(export, weights))
    return 0


def _keep(keep: str) -> str | None:
    if keep.lower() == NO_KEEP:
        return None
    if keep.lower() not in KEEP_TYPES:
        raise CliError(f"--keep must be {', '.join(KEEP_TYPES)} or {NO_KEEP}, got {keep!r}")
    return keep


def _source(model: str | None) -> Path:
    """The source GGUF file: MODEL, or the embedded default."""
    from sw_hooks.models import DEFAULT_MODEL, default_model_path

    if model is None or model == DEFAULT_MODEL:
        try:
            return default_model_path()
        except FileNotFoundError as error:
            raise CliError(first_line(error)) from None
    return Path(model).expanduser()


def _write_manifest(
    weights: list[Any], model: Any, path: Path, source: Path, *, quiet: bool
) -> None:
    from sw_hooks.export.manifest import write_manifest

    try:
        write_manifest(weights, model, path, source=source)
    except OSError as error:
        raise CliError(f"cannot write {path}: {error.strerror or error}") from None
    progress(f"wrote {path}", quiet=quiet)


def format_summary(export: GgufExport, weights: list[Any]) -> str:
    """What was written: the file, its types and its size."""
    lines = [
        f"wrote {export.path}: {export.bytes_written / 2**20:.1f} MiB, "
        f"weight matrices at {export.quant_type}",
        f"super weights: {len(weights)}",
    ]
    lines += [f"kept {name} at {qtype}" for name, qtype in export.kept.items()]
    lines += [
        f"left {name} at {qtype} (its rows do not fit a {export.quant_type} block)"
        for name, qtype in export.unfit.items()
    ]
    return "\n".join(lines)
