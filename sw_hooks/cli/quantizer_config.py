"""``sw-hooks quantizer-config``: a detection result as a quantizer's keep-at-high-precision config."""

from __future__ import annotations

import argparse
from pathlib import Path

from sw_hooks.cli._common import (
    CliError,
    add_placement_arguments,
    check_placement_arguments,
    first_line,
    load_model_for_cli,
    progress,
)
from sw_hooks.cli._paths import check_output_file, write_output
from sw_hooks.core.results import DetectionResult
from sw_hooks.export.quantizers import HF_METHODS, TOOLS, KeptModules, kept_modules, render


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "quantizer-config",
        help="turn a detection result into a quantizer config that keeps its modules",
        description=(
            "Write the config that makes a quantizer (llm-compressor, torchao, Hugging Face, "
            "GPTQModel, llama.cpp) leave the modules holding the verified super weights at "
            "high precision. Give --model to count the parameters kept."
        ),
    )
    parser.add_argument("result", type=Path, help="a detection result (sw-hooks detect --json)")
    parser.add_argument("--tool", required=True, choices=TOOLS, help="the quantizer")
    parser.add_argument(
        "-o", "--output", type=Path, default=None, help="file to write (default: stdout)"
    )
    parser.add_argument(
        "--all-candidates",
        action="store_true",
        help="keep the modules of unverified candidates too",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="the model (id, folder or .gguf) whose module sizes are counted; "
        "it also names llama.cpp's tensors (default: no model, nothing counted)",
    )
    parser.add_argument("--gguf", default=None, help="GGUF file name inside a --model folder")
    parser.add_argument(
        "--arch",
        default=None,
        help="transformers model_type for llama.cpp tensor names (default: the model's)",
    )
    parser.add_argument("--scheme", default="W4A16", help="llm-compressor scheme (default: W4A16)")
    parser.add_argument(
        "--method",
        default=HF_METHODS[0],
        choices=HF_METHODS,
        help=f"Hugging Face quantization method (default: {HF_METHODS[0]})",
    )
    parser.add_argument(
        "--torchao-config",
        default="Int8WeightOnlyConfig()",
        help="torchao config expression (default: Int8WeightOnlyConfig())",
    )
    parser.add_argument(
        "--tensor-type", default="f16", help="llama.cpp type of the kept tensors (default: f16)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    parser.add_argument(
        "--no-cache", action="store_true", help="convert a GGUF --model afresh (see detect --help)"
    )
    add_placement_arguments(parser)
    parser.set_defaults(func=run)


def _tool_options(args: argparse.Namespace) -> dict[str, object]:
    if args.tool == "llm-compressor":
        return {"scheme": args.scheme}
    if args.tool == "torchao":
        return {"config": args.torchao_config}
    if args.tool == "hf":
        return {"method": args.method}
    if args.tool == "llama.cpp":
        return {"tensor_type": args.tensor_type, "architecture": args.arch}
    return {}


def _read_result(path: Path) -> DetectionResult:
    try:
        return DetectionResult.load(path)
    except (OSError, ValueError) as error:
        raise CliError(f"cannot read {path}: {first_line(error)}") from None


_PROBE = KeptModules(("model.layers.0.mlp.down_proj",), super_weights=1)
"""A stand-in to render with before any file is read: it checks the options alone."""


def _check_options(args: argparse.Namespace) -> None:
    """Refuse bad options before the result is read or a model loads."""
    if args.gguf is not None and args.model is None:
        raise CliError("--gguf names a file inside a --model folder; give that folder as --model")
    if args.tool == "llama.cpp" and args.arch is None and args.model is None:
        raise CliError("--tool llama.cpp names GGUF tensors: give --arch or --model")
    options = _tool_options(args)
    if args.tool == "llama.cpp" and args.arch is None:
        options["architecture"] = "llama"  # a stand-in: the model's own is known once it loads
    render(_PROBE, args.tool, **options)
    check_placement_arguments(args)


def run(args: argparse.Namespace) -> int:
    _check_options(args)
    check_output_file(args.output, "-o")
    result = _read_result(args.result)
    kept = kept_modules(result, candidates=args.all_candidates)
    if args.model is not None:
        model, _, _ = load_model_for_cli(args)
        kept = kept_modules(result, model, candidates=args.all_candidates)
    text = render(kept, args.tool, **_tool_options(args))
    if args.output is None:
        print(text, end="")
    else:
        write_output(args.output, text)
        progress(f"{args.output}: {kept.summary()}", quiet=args.quiet)
    return 0
