"""Detection with verification on SmolLM2-135M (loading excluded), and magnitude top-k throughput.

python benchmarks/bench_detect.py [--tokens 512] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sw_hooks import calibration_text, load_model, tokenize
from sw_hooks.detect import run_detection
from sw_hooks.magnitude import decoder_linears, largest_weights

from _common import interleaved, write


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    model, tokenizer = load_model()
    calibration = tokenize(tokenizer, calibration_text(), max_tokens=args.tokens)

    start = time.perf_counter()
    result = run_detection(model, calibration[:, :128], calibration=calibration)
    detect_seconds = time.perf_counter() - start

    linears = decoder_linears(model)
    all_params = {
        n: m
        for n, m in model.named_modules()
        if n and getattr(m, "weight", None) is not None and m.weight.dim() == 2
    }
    weight_bytes = sum(m.weight.numel() * m.weight.element_size() for m in all_params.values())

    def topk_stream():
        largest_weights(model, 16, modules=all_params)

    def read_once():  # the floor: one pass over every weight, nothing else
        with torch.no_grad():
            for m in all_params.values():
                m.weight.abs().max()

    times = interleaved(
        {"streamed top-k": topk_stream, "abs().max() pass": read_once}, args.repeats, warmup=1
    )
    topk_s = statistics.median(times["streamed top-k"])
    floor_s = statistics.median(times["abs().max() pass"])
    print(
        f"detection + verification, {args.tokens} calibration tokens: {detect_seconds:.1f} s "
        f"({len(result.super_weights)} candidates, {len(result.verified)} super, {result.passes} passes)"
    )
    print(
        f"magnitude top-k over {len(all_params)} matrices, {weight_bytes / 2**20:.0f} MiB: "
        f"{topk_s:.3f} s = {weight_bytes / topk_s / 1e9:.2f} GB/s "
        f"(one abs().max() pass: {weight_bytes / floor_s / 1e9:.2f} GB/s; ratio {topk_s / floor_s:.2f})"
    )
    path = write(
        "detect",
        {
            "tokens": args.tokens,
            "detect_seconds": detect_seconds,
            "candidates": len(result.super_weights),
            "super": [w.to_dict() for w in result.verified],
            "decoder_linears": len(linears),
            "topk_seconds": topk_s,
            "topk_gb_per_s": weight_bytes / topk_s / 1e9,
            "single_pass_gb_per_s": weight_bytes / floor_s / 1e9,
            "weight_bytes": weight_bytes,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
