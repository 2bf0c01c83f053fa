"""GPU check: recorder overhead (eager and compiled), detection time and peak-memory delta.

A Llama-7B-shaped model (hidden 4096, intermediate 11008, 32 layers) with random bf16
weights, built directly on the device, with one super weight planted (layer 1, ``[5, 17]``,
triggered by token 1) so the figures also say whether the timed runs gave the right answers:
``detected`` is the first candidate detection names, ``compiled_recorded_max_rel_diff`` how far
the compiled model's recorded maxima lie from the eager model's. Prints a table and writes
the figures as JSON.

    python benchmarks/gpu_check.py                      # CUDA, 7B shape, a few minutes
    python benchmarks/gpu_check.py --device cpu --small # the same script on a tiny shape
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from sw_hooks.analysis.detect import run_detection
from sw_hooks.core.record import Recorder, record
from sw_hooks.testing import plant_super_weight

PLANTED = (1, 5, 17)
"""Layer, row and column of the planted super weight."""
TRIGGER_TOKEN = 1

SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "small": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, vocab_size=256),
}  # fmt: skip


def build(shape: str, device: str, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    layer, row, col = PLANTED
    plant_super_weight(model, layer, row, col, trigger_token=TRIGGER_TOKEN, target_token=2)
    return model.eval()


def prompt_ids(shape: str, batch: int, tokens: int, device: str) -> torch.Tensor:
    """Random tokens with the trigger at position 3 of every row (nowhere else)."""
    ids = torch.randint(16, SHAPES[shape]["vocab_size"], (batch, tokens), device=device)
    ids[:, min(3, tokens - 1)] = TRIGGER_TOKEN
    return ids


def max_rel_diff(a: Recorder, b: Recorder) -> float:
    """The largest relative difference of two recorders' per-channel input and output maxima."""
    worst = 0.0
    for name, stats in a.stats.items():
        other = b.stats[name]
        for mine, theirs in ((stats.input, other.input), (stats.output, other.output)):
            if mine is None or theirs is None:
                continue
            scale = mine.abs_max.abs().max().clamp_min(1e-12)
            worst = max(worst, float((mine.abs_max - theirs.abs_max).abs().max() / scale))
    return worst


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def peak_bytes(fn: Callable[[], object], device: str) -> int | None:
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def check(args: argparse.Namespace) -> dict[str, object]:
    shape = "small" if args.small else "7b"
    model = build(shape, args.device, torch.bfloat16)
    ids = prompt_ids(shape, args.batch, args.tokens, args.device)

    def forward(net: torch.nn.Module) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return net(ids).logits

        return run

    figures: dict[str, object] = {"device": args.device, "shape": shape, "dtype": "bfloat16",
                                  "batch": args.batch, "tokens": args.tokens}  # fmt: skip
    eager = timed(forward(model), args.device, args.repeats)
    peak_plain = peak_bytes(forward(model), args.device)
    with record(model) as eager_recorder:
        eager_recorded = timed(forward(model), args.device, args.repeats)
        peak_recorded = peak_bytes(forward(model), args.device)
    figures |= {"eager_s": eager, "eager_recorded_s": eager_recorded,
                "eager_overhead_ratio": eager_recorded / eager}  # fmt: skip
    if peak_plain is not None and peak_recorded is not None:
        figures["peak_memory_delta_bytes"] = peak_recorded - peak_plain

    torch.compiler.reset()
    compiled = torch.compile(model, backend=args.backend)
    plain_compiled = timed(forward(compiled), args.device, args.repeats)
    torch.compiler.reset()  # hooks must be in place when the graph is compiled
    with record(model) as recorder:
        compiled_recorded = timed(forward(compiled), args.device, args.repeats)
    assert recorder.stats, "the compiled model ran without the recorder's hooks"
    figures |= {"compiled_s": plain_compiled, "compiled_recorded_s": compiled_recorded,
                "compiled_overhead_ratio": compiled_recorded / plain_compiled,
                "compiled_recorded_max_rel_diff": max_rel_diff(eager_recorder, recorder),
                "backend": args.backend}  # fmt: skip
    torch.compiler.reset()

    _sync(args.device)
    start = time.perf_counter()
    result = run_detection(model, ids[:1], verify_impact=False)
    _sync(args.device)
    first = result.candidates[0] if result.candidates else None
    figures |= {"detection_s": time.perf_counter() - start,
                "candidates": len(result.candidates),
                "planted": list(PLANTED),
                "detected": None if first is None else [first.layer, first.row, first.col]}  # fmt: skip
    return figures


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="a tiny Llama shape (CPU checks)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_check.json"))
    parser.add_argument(
        "--cli",
        action="store_true",
        help="also run sw-hooks detect --device DEVICE --dtype bfloat16 with "
        "verification on SmolLM2 and the 7B-shaped checkpoint (_gpu_cli)",
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="build_7b.py's folder for --cli (built there when empty)",
    )
    parser.add_argument("--no-smollm2", action="store_true", help="--cli without SmolLM2")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("CUDA is not available; use --device cpu --small")
    figures = check(args)
    if args.cli:
        from _gpu_cli import cli_runs

        figures["cli"] = cli_runs(
            args.device, args.small, args.checkpoint, args.tokens, smollm2=not args.no_smollm2
        )
    for key, value in figures.items():
        shown = f"{value:.4f}" if isinstance(value, float) else value
        print(f"{key:>26}  {shown}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
