"""``sw-hooks detect FOLDER --stream``: detection block by block from a checkpoint folder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sw_hooks.analysis.detect import DetectionOptions
from sw_hooks.cli._common import (
    PROMPT_TOKENS,
    CliError,
    first_line,
    progress,
    step,
    text_name,
    token_ids,
)
from sw_hooks.cli._paths import write_output
from sw_hooks.core.results import DetectionResult


def check_stream_model(args: argparse.Namespace) -> Path:
    """The checkpoint folder ``--stream`` reads, checked before anything loads."""
    folder = Path(args.model).expanduser() if args.model else None
    if folder is None or args.gguf is not None or not folder.is_dir():
        raise CliError("--stream reads a safetensors checkpoint folder: give its path as MODEL")
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        raise CliError(f"--stream needs config.json and .safetensors weights in {folder}")
    if args.device_map is not None:
        raise CliError("--stream loads one block at a time on --device; it takes no --device-map")
    return folder


def _placement(args: argparse.Namespace) -> tuple[torch.dtype | None, torch.device]:
    """``--dtype`` (``None``: the checkpoint's own) and ``--device`` (``auto`` resolved)."""
    from sw_hooks.placement import placement

    chosen = placement(args.device, args.dtype)
    return chosen.dtype, chosen.device or torch.device("cpu")


def run_streamed(args: argparse.Namespace, options: DetectionOptions, text: str) -> int:
    """Open the checkpoint lazily, detect block by block, print and write as ``detect`` does."""
    from transformers import AutoTokenizer

    from sw_hooks.analysis.streamed import run_streamed_detection
    from sw_hooks.core.streaming import open_streamed

    folder = check_stream_model(args)
    try:
        with step(f"opening {folder} (resident weights only)", quiet=args.quiet):
            streamed = open_streamed(folder, *_placement(args))
            tokenizer = AutoTokenizer.from_pretrained(folder)
    except (ValueError, OSError) as error:
        raise CliError(first_line(error)) from None
    calibration = token_ids(tokenizer, text, args.max_tokens, prepend_bos=args.bos)
    prompt = (
        token_ids(tokenizer, args.prompt, PROMPT_TOKENS, prepend_bos=args.bos)
        if args.prompt is not None
        else calibration[:, :PROMPT_TOKENS]
    )
    with step("detecting block by block", quiet=args.quiet):
        try:
            run = run_streamed_detection(
                streamed,
                prompt,
                calibration=calibration,
                verify_impact=not args.no_verify,
                options=options,
                model_name=str(args.model),
                prepend_bos=args.bos,
                progress=lambda line: progress(line, quiet=args.quiet),
                calibration_name=text_name(args.text),
            )
        except ValueError as error:
            raise CliError(first_line(error)) from None
    cost = run.cost
    progress(
        f"streamed: {cost.sweeps} sweeps, {cost.block_loads} block loads, "
        f"{cost.bytes_read} bytes read, {cost.forwards:.3f} forwards, "
        f"{cost.head_positions} LM-head positions",
        quiet=args.quiet,
    )
    _print_and_write(run.result, args)
    return 0


def _print_and_write(result: DetectionResult, args: argparse.Namespace) -> None:
    from sw_hooks.cli.detect import format_table

    print(format_table(result))
    if args.json_out is not None:
        write_output(args.json_out, json.dumps(result.to_dict(), indent=2) + "\n")
        progress(f"wrote {args.json_out}", quiet=args.quiet)
