"""``sw-hooks quantizer-config``: a detection result as a quantizer's keep-at-high-precision config."""

from __future__ import annotations

import argparse
from pathlib import Path

from sw_hooks.cli._common import (
    add_model_arguments,
    check_model_arguments,
    load_model_for_cli,
    progress,
    read_text,
    token_ids,
)
from sw_hooks.cli._paths import check_output_file, write_output
from sw_hooks.cli._super_weights import add_super_weights_arguments, detect_on, read_detection
from sw_hooks.export.quantizers import HF_METHODS, TOOLS, KeptModules, kept_modules, render


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "quantizer-config",
        help="turn a detection result into a quantizer config that keeps its modules",
        description=(
            "Write the config that makes a quantizer (llm-compressor, torchao, Hugging Face, "
            "GPTQModel, llama.cpp) leave the modules holding the verified super weights at "
            "high precision, counting the parameters kept in MODEL. The super weights come "
            "from --super-weights FILE (sw-hooks detect --json), else they are detected on MODEL."
        ),
    )
    add_model_arguments(parser)
    add_super_weights_arguments(parser)
    parser.add_argument("--tool", required=True, choices=TOOLS, help="the quantizer")
    parser.add_argument(
        "-o", "--output", type=Path, default=None, help="file to write (default: stdout)"
    )
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


_PROBE = KeptModules(("model.layers.0.mlp.down_proj",), super_weights=1)
"""A stand-in to render with before any file is read: it checks the options alone."""


def _check_options(args: argparse.Namespace) -> None:
    """Refuse bad options before the result is read or a model loads."""
    check_model_arguments(args)
    options = _tool_options(args)
    if args.tool == "llama.cpp" and args.arch is None:
        options["architecture"] = "llama"  # a stand-in: the model's own is known once it loads
    render(_PROBE, args.tool, **options)


def run(args: argparse.Namespace) -> int:
    _check_options(args)
    check_output_file(args.output, "-o")
    given = read_detection(args)
    if given is not None:
        kept_modules(given, candidates=args.candidates)  # nothing to keep: refused before loading
    text = read_text(args.text) if given is None else ""
    model, tokenizer, name = load_model_for_cli(args)
    result = given or detect_on(
        model,
        token_ids(tokenizer, text, args.max_tokens),
        candidates=args.candidates,
        quiet=args.quiet,
        name=name,
    )
    kept = kept_modules(result, model, candidates=args.candidates)
    config = render(kept, args.tool, **_tool_options(args))
    if args.output is None:
        print(config, end="")
    else:
        write_output(args.output, config)
        progress(f"{args.output}: {kept.summary()}", quiet=args.quiet)
    return 0
