"""Vectorized block RTN against a per-block Python loop, on every linear weight of SmolLM2-135M.

Both sides quantize the same weights (all decoder linear layers, 1-D blocks, 4 bits) with
the same arithmetic; the loop quantizes one block at a time. Runs are interleaved
(vectorized, loop, vectorized, ...) so that a busy machine slows both alike. The loop is
timed on the first ``--loop-fraction`` of the weights for small blocks and scaled up.

    python benchmarks/bench_quantize.py [--repeats 3] [--block-size 4096 --block-size 128]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from sw_hooks.models import load_model
from sw_hooks.quant.config import QuantConfig
from sw_hooks.quant.primitives import choose_qparams, fake_quantize, quantize_tensor
from sw_hooks.quant.targets import select_modules

RESULTS = Path(__file__).parent / "results" / "quantize.json"


def loop_quantize(weight: torch.Tensor, bits: int, block_size: int) -> torch.Tensor:
    """The straightforward version: a Python loop over the flattened tensor's blocks."""
    flat = weight.reshape(-1).float()
    out = torch.empty_like(flat)
    for start in range(0, flat.numel(), block_size):
        block = flat[start : start + block_size].reshape(1, -1)
        out[start : start + block_size] = fake_quantize(block, choose_qparams(block, bits))[0]
    return out.reshape(weight.shape).to(weight.dtype)


def vectorized_quantize(weight: torch.Tensor, bits: int, block_size: int) -> torch.Tensor:
    """The library's vectorized path, called like :func:`loop_quantize`."""
    return quantize_tensor(weight, QuantConfig(bits, block_size))


def time_all(weights: list[torch.Tensor], quantize, bits: int, block_size: int) -> float:
    start = time.perf_counter()
    for weight in weights:
        quantize(weight, bits, block_size)
    return time.perf_counter() - start


def loop_plan(
    weights: list[torch.Tensor], size: int, budget: int
) -> tuple[list[torch.Tensor], float]:
    """The prefix of the weights the loop is timed on (at most ``budget`` blocks), and the
    factor that scales its time up to all of them."""
    subset, counted = [], 0
    for weight in weights:
        if counted >= budget:
            break
        subset.append(weight)
        counted += -(-weight.numel() // size)
    total = sum(w.numel() for w in weights)
    return subset, total / sum(w.numel() for w in subset)


def summary(
    size: int,
    weights: list[torch.Tensor],
    vectorized: list[float],
    looped: list[float],
    scale_up: float,
) -> dict[str, float | int]:
    return {
        "block_size": size,
        "blocks": sum(-(-w.numel() // size) for w in weights),
        "vectorized_min_s": min(vectorized),
        "vectorized_median_s": statistics.median(vectorized),
        "loop_min_s": min(looped),
        "loop_median_s": statistics.median(looped),
        "speedup_paired_median": statistics.median(
            b / a for a, b in zip(vectorized, looped, strict=True)
        ),
        "loop_measured_fraction": 1 / scale_up,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--block-size", type=int, action="append", default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--loop-budget",
        type=int,
        default=5_000,
        help="time the loop on at most this many blocks and scale up",
    )
    args = parser.parse_args()
    sizes = args.block_size or [4096, 1024, 128]
    model, _ = load_model()
    weights = [m.weight.detach() for m in select_modules(model).values()]
    total = sum(w.numel() for w in weights)
    plans = {size: loop_plan(weights, size, args.loop_budget) for size in sizes}
    for size, (subset, _) in plans.items():
        for weight in subset[:2]:  # same numbers from both sides before timing anything
            expected = loop_quantize(weight, args.bits, size)
            assert torch.allclose(vectorized_quantize(weight, args.bits, size), expected, atol=1e-6)
    timings: dict[int, tuple[list[float], list[float]]] = {size: ([], []) for size in sizes}
    for _ in range(args.repeats):  # interleaved: a busy spell slows both sides alike
        for size in sizes:
            subset, scale_up = plans[size]
            timings[size][0].append(time_all(weights, vectorized_quantize, args.bits, size))
            timings[size][1].append(time_all(subset, loop_quantize, args.bits, size) * scale_up)
    rows = [summary(size, weights, *timings[size], plans[size][1]) for size in sizes]
    print(
        f"SmolLM2-135M, {len(weights)} linear weights, {total / 1e6:.1f} M elements, "
        f"{args.bits} bits, {torch.get_num_threads()} threads, {args.repeats} interleaved repeats"
    )
    print(f"{'block':>6}  {'blocks':>8}  {'vectorized s':>12}  {'loop s':>9}  {'speedup':>8}")
    for row in rows:
        note = ""
        if row["loop_measured_fraction"] < 1:
            note = f"  (loop timed on {row['loop_measured_fraction']:.0%} of the weights, scaled)"
        print(
            f"{row['block_size']:>6}  {row['blocks']:>8}  {row['vectorized_min_s']:>12.2f}  "
            f"{row['loop_min_s']:>9.2f}  {row['speedup_paired_median']:>7.0f}x{note}"
        )
    print("times: fastest repeat; speedup: median over repeats of loop time / vectorized time")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "model": "SmolLM2-135M-Instruct",
                "bits": args.bits,
                "weights": len(weights),
                "elements": total,
                "threads": torch.get_num_threads(),
                "repeats": args.repeats,
                "machine": platform.machine(),
                "torch": torch.__version__,
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
