"""GPU check: recorder overhead (eager and compiled), detection time and peak-memory delta.

A Llama-7B-shaped model (hidden 4096, intermediate 11008, 32 layers) with random bf16
weights, built directly on the device. Prints a table and writes the figures as JSON.

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
from sw_hooks.core.record import record

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
    return model.eval()


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
    ids = torch.randint(
        0, SHAPES[shape]["vocab_size"], (args.batch, args.tokens), device=args.device
    )

    def forward(net: torch.nn.Module) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return net(ids).logits

        return run

    figures: dict[str, object] = {"device": args.device, "shape": shape, "dtype": "bfloat16",
                                  "batch": args.batch, "tokens": args.tokens}  # fmt: skip
    eager = timed(forward(model), args.device, args.repeats)
    peak_plain = peak_bytes(forward(model), args.device)
    with record(model):
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
                "backend": args.backend}  # fmt: skip
    torch.compiler.reset()

    _sync(args.device)
    start = time.perf_counter()
    result = run_detection(model, ids[:1], verify_impact=False)
    _sync(args.device)
    figures |= {"detection_s": time.perf_counter() - start,
                "candidates": len(result.super_weights)}  # fmt: skip
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
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("CUDA is not available; use --device cpu --small")
    figures = check(args)
    for key, value in figures.items():
        shown = f"{value:.4f}" if isinstance(value, float) else value
        print(f"{key:>26}  {shown}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
