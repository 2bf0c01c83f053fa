"""``sw-hooks detect``: find the super weights of a model and measure each one."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sw_hooks.analysis.detect import DetectionOptions, run_detection
from sw_hooks.analysis.losses import Loss, as_loss
from sw_hooks.cli._common import (
    PROMPT_TOKENS,
    CliError,
    add_model_arguments,
    check_model_arguments,
    load_model_for_cli,
    progress,
    read_text,
    step,
    text_name,
    token_ids,
)
from sw_hooks.cli._paths import check_output_file, write_output
from sw_hooks.cli.detect_streamed import check_stream_model, run_streamed
from sw_hooks.core.results import DetectionResult
from sw_hooks.outputs.tables import (
    fixed_width,
    measured_on,
    screened_note,
    super_experts_table,
    weights_table,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "detect",
        help="detect super weights and verify them by ablation",
        description="Detect super weights from activation spikes and "
        "measure each one's effect on perplexity.",
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--prompt",
        default=None,
        help=f"prompt to record spikes on (default: the first {PROMPT_TOKENS} tokens of the text)",
    )
    parser.add_argument(
        "--bos", action="store_true", help="put the tokenizer's BOS token before the prompt"
    )
    parser.add_argument(
        "--min-impact",
        type=float,
        default=2.0,
        help="perplexity ratio at which a candidate is a super weight (default: 2.0)",
    )
    parser.add_argument(
        "--spike-factor",
        type=float,
        default=8.0,
        help="how far above the median layer a spike must stand (default: 8)",
    )
    parser.add_argument("--no-verify", action="store_true", help="skip the ablation measurements")
    parser.add_argument(
        "--stream",
        action="store_true",
        help="read the model block by block from its safetensors checkpoint folder: memory "
        "holds one decoder block, the embeddings and the LM head (results as in memory)",
    )
    parser.add_argument(
        "--json", type=Path, default=None, dest="json_out", help="write the result as JSON here"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    options = _options(args)
    check_model_arguments(args)
    check_output_file(args.json_out, "--json")
    if args.stream:
        check_stream_model(args)
    if args.prompt is not None and not args.prompt.strip():
        raise CliError("--prompt is empty")
    text = read_text(args.text)
    if args.stream:
        return run_streamed(args, options, text)
    model, tokenizer, name = load_model_for_cli(args)
    loss = _loss(model, tokenizer) if not args.no_verify else None
    calibration = token_ids(tokenizer, text, args.max_tokens, prepend_bos=args.bos)
    prompt = (
        token_ids(tokenizer, args.prompt, PROMPT_TOKENS, prepend_bos=args.bos)
        if args.prompt is not None
        else calibration[:, :PROMPT_TOKENS]
    )
    with step("detecting", quiet=args.quiet):
        result = run_detection(
            model,
            prompt,
            calibration=calibration,
            verify_impact=not args.no_verify,
            options=options,
            model_name=name,
            prepend_bos=args.bos,
            loss_fn=loss,
            progress=lambda line: progress(line, quiet=args.quiet),
            calibration_name=text_name(args.text),
        )
    print(format_table(result))
    if args.json_out is not None:
        write_output(args.json_out, json.dumps(result.to_dict(), indent=2) + "\n")
        progress(f"wrote {args.json_out}", quiet=args.quiet)
    return 0


def _loss(model: torch.nn.Module, tokenizer: object) -> Loss:
    """The loss chosen from the model's class (a causal LM keeps its perplexity); a masked
    LM's mask token comes from the tokenizer."""
    try:
        return as_loss(model, None, tokenizer=tokenizer)
    except ValueError as error:
        raise CliError(str(error)) from None


def _options(args: argparse.Namespace) -> DetectionOptions:
    try:
        return DetectionOptions(min_impact=args.min_impact, spike_factor=args.spike_factor)
    except ValueError as error:
        raise CliError(str(error)) from None


def format_table(result: DetectionResult) -> str:
    """The result as fixed-width tables: every candidate, super weights first, then whole
    super experts (the report shows the same tables)."""
    lines = [f"model: {result.model}"]
    if result.baseline_perplexity is not None:
        lines.append(f"baseline perplexity: {result.baseline_perplexity:.3f}")
    lines += [line for line in (measured_on(result),) if line]
    lines.append(fixed_width(weights_table(result)))
    if result.joint_ablation_ratio is not None:
        lines.append(
            f"all {len(result.candidates)} candidates zeroed together: "
            f"perplexity x{result.joint_ablation_ratio:.2f}"
        )
    lines.append(f"super weights: {len(result.verified)} of {len(result.candidates)} candidates")
    if result.super_experts:
        lines += ["", "super experts (whole experts, verified by pruning their routing):"]
        lines.append(fixed_width(super_experts_table(result)))
    return "\n".join(lines + [line for line in (screened_note(result),) if line])
