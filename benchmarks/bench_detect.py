"""Detection with verification on SmolLM2-135M (loading excluded), and magnitude top-k throughput.

Verification is timed four ways in one interleaved run: the previous method (every
candidate and the joint ablation over every window, full forwards), with prefix reuse,
with prefix reuse and screening (the default), and the default block by block
(:mod:`sw_hooks.analysis.streamed` on the model in memory: every window through a block
before the next, the LM head on scored positions only). Times are also given in
forward-equivalents: over one plain 512-token forward, and over one plain forward of the
whole calibration text, both timed in the same run.

python benchmarks/bench_detect.py [--tokens 1024] [--prompt-tokens 128] [--repeats 2]
    [--variants "prefix reuse + screening (default),block by block (in memory)"]
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import asdict

import torch

from sw_hooks import calibration_text, load_model, tokenize
from sw_hooks.analysis.detect import DetectionOptions, forward_on_device, run_detection
from sw_hooks.analysis.magnitude import decoder_linears, largest_weights
from sw_hooks.analysis.streamed import run_streamed_detection
from sw_hooks.core.streaming import in_memory

from _common import interleaved, paired_ratio, write

VARIANTS = {
    "previous (full forwards)": {"reuse_prefix": False, "screen_exponent": None},
    "prefix reuse": {"reuse_prefix": True, "screen_exponent": None},
    "prefix reuse + screening (default)": {},
    "block by block (in memory)": {},
}
BLOCK_MAJOR = "block by block (in memory)"
"""Detection through :func:`sw_hooks.analysis.streamed.run_streamed_detection` (every window
through a block before the next; the LM head on scored positions only), default options."""


def compare_verification(
    model, calibration, prompt, repeats: int, variants: list[str]
) -> dict[str, object]:
    """Detection with verification under each variant, interleaved, in forward-equivalents:
    over one plain 512-token forward, and over one plain forward of the whole calibration
    text (both timed in this run)."""
    results: dict[str, object] = {}
    plain = {"512-token forward": lambda: forward_on_device(model, calibration[:, :512]),
             "calibration-text forward": lambda: forward_on_device(model, calibration)}  # fmt: skip

    def run(name: str):
        def call() -> None:
            options = DetectionOptions(**VARIANTS[name])
            if name == BLOCK_MAJOR:
                streamed = run_streamed_detection(
                    in_memory(model), prompt, calibration=calibration, options=options
                )
                results[name], results["block-major cost"] = streamed.result, streamed.cost
            else:
                results[name] = run_detection(
                    model, prompt, calibration=calibration, options=options
                )

        return call

    times = interleaved(plain | {name: run(name) for name in variants}, repeats, warmup=0)
    forward = statistics.median(times["512-token forward"])
    text_forward = statistics.median(times["calibration-text forward"])
    rows = {}
    reference = results[variants[0]]
    for name in variants:
        seconds = statistics.median(times[name])
        result = results[name]
        drift = max(
            abs(new.impact / old.impact - 1)
            for new, old in zip(result.candidates, reference.candidates, strict=True)
        )
        same = [w.verdict for w in result.candidates] == [w.verdict for w in reference.candidates]
        rows[name] = {
            "seconds": seconds,
            "forward_equivalents": seconds / forward,
            "calibration_text_forwards": seconds / text_forward,
            "vs_first": paired_ratio(times, name, variants[0]),
            "same_verdicts": same,
            "max_impact_change": drift,
            "impacts": [w.impact for w in result.candidates],
        }
        print(
            f"{name:38s} {seconds:6.1f} s  {seconds / forward:5.1f} forwards  "
            f"{seconds / text_forward:5.1f} text forwards  x{rows[name]['vs_first']:.2f}  "
            f"verdicts same: {same}  max impact change {drift:.2%}"
        )
    cost = results.get("block-major cost")
    return {"forward_seconds": forward, "calibration_text_forward_seconds": text_forward,
            "variants": rows, "block_major_cost": asdict(cost) if cost else None}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated; the first is the reference")  # fmt: skip
    args = parser.parse_args()
    model, tokenizer = load_model()
    calibration = tokenize(tokenizer, calibration_text(), max_tokens=args.tokens)
    prompt = calibration[:, : args.prompt_tokens]
    variants = args.variants.split(",")
    verification = compare_verification(model, calibration, prompt, args.repeats, variants)
    result = run_detection(model, prompt, calibration=calibration)

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
        f"{args.tokens} calibration tokens: {len(result.candidates)} candidates, "
        f"{len(result.verified)} super, {result.passes} passes"
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
            "prompt_tokens": args.prompt_tokens,
            "verification": verification,
            "candidates": len(result.candidates),
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
