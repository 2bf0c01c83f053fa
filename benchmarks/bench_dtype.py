"""SmolLM2-135M detected in float32 and in bfloat16: the same candidates, verdicts and impacts?

Both models come from ``load_model(dtype=...)`` (the path of ``sw-hooks detect --dtype``);
detection runs as the CLI runs it (the first 128 tokens recorded, 1024 calibration tokens),
interleaved, loading excluded. Prints each candidate's impact in both dtypes and the largest
relative difference; writes ``benchmarks/results/dtype.json``.

    python benchmarks/bench_dtype.py [--tokens 1024] [--repeats 1]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from sw_hooks import calibration_text, load_model, tokenize
from sw_hooks.analysis.detect import run_detection

from _common import interleaved, paired_ratio, write

DTYPES = ("float32", "bfloat16")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    models = {name: load_model(dtype=name) for name in DTYPES}
    tokenizer = models["float32"][1]
    calibration = tokenize(tokenizer, calibration_text(), max_tokens=args.tokens)
    prompt = calibration[:, : args.prompt_tokens]
    results = {}

    def detect(name: str):
        def call() -> None:
            model = models[name][0]
            results[name] = run_detection(model, prompt, calibration=calibration)

        return call

    times = interleaved({name: detect(name) for name in DTYPES}, args.repeats, warmup=0)
    full, half = results["float32"], results["bfloat16"]
    rows = _candidate_rows(full, half)
    for row in rows:
        print(
            f"{row['weight']:<44} fp32 x{row['impact_float32']:<8.3f} {row['verdict_float32']:<6} "
            f"bf16 x{row['impact_bfloat16']:<8.3f} {row['verdict_bfloat16']:<6} "
            f"diff {row['relative_difference']:.2%}"
        )
    same_candidates = [w.coordinate for w in full.candidates] == [
        w.coordinate for w in half.candidates
    ]
    same_verdicts = all(r["verdict_float32"] == r["verdict_bfloat16"] for r in rows)
    largest = max((r["relative_difference"] for r in rows), default=0.0)
    ratio = paired_ratio(times, "bfloat16", "float32")
    print(
        f"same candidates: {same_candidates}; same verdicts: {same_verdicts}; largest impact "
        f"difference {largest:.2%}; baseline perplexity fp32 {full.baseline_perplexity:.3f}, "
        f"bf16 {half.baseline_perplexity:.3f}; bf16 time x{ratio:.2f} of fp32"
    )
    path = write(
        "dtype",
        {
            "tokens": args.tokens,
            "prompt_tokens": args.prompt_tokens,
            "same_candidates": same_candidates,
            "same_verdicts": same_verdicts,
            "largest_relative_impact_difference": largest,
            "baseline_perplexity": {
                "float32": full.baseline_perplexity,
                "bfloat16": half.baseline_perplexity,
            },
            "seconds": {name: statistics.median(t) for name, t in times.items()},
            "bfloat16_vs_float32_time": ratio,
            "candidates": rows,
            "model_dtypes": {name: str(models[name][0].dtype) for name in DTYPES},
        },
    )
    print(f"wrote {path}")


def _candidate_rows(full, half) -> list[dict[str, object]]:
    """Each float32 candidate beside the bfloat16 candidate at the same coordinate."""
    by_coordinate = {w.coordinate: w for w in half.candidates}
    rows = []
    for weight in full.candidates:
        other = by_coordinate.get(weight.coordinate)
        if other is None:
            continue
        rows.append(
            {
                "weight": f"{weight.module}[{weight.row}, {weight.col}]",
                "impact_float32": weight.impact,
                "impact_bfloat16": other.impact,
                "verdict_float32": weight.verdict,
                "verdict_bfloat16": other.verdict,
                "relative_difference": abs(other.impact / weight.impact - 1),
            }
        )
    return rows


if __name__ == "__main__":
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    main()
