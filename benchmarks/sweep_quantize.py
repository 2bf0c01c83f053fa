"""The holdout sweep on SmolLM2-135M: perplexity after block RTN, with and without the super weight.

Every decoder linear weight (not the embeddings or the LM head) is fake-quantized with 1-D
blocks; each setting runs without and with the verified super weight held out. Then W8A8
(per-token 8-bit activations on top of 8-bit weights) without and with the super
activation held out. Prints a Markdown table and writes benchmarks/results/quantize_sweep.json.

    python benchmarks/sweep_quantize.py [--tokens 512]
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch

from sw_hooks.analysis.impact import perplexity
from sw_hooks.models import calibration_text, load_model, tokenize
from sw_hooks.quant.activations import quantize_activations
from sw_hooks.quant.config import QuantConfig
from sw_hooks.quant.quantize import quantize_model

RESULTS = Path(__file__).parent / "results" / "quantize_sweep.json"
SUPER_WEIGHT = ("model.layers.11.mlp.down_proj", 507, 1229)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[4096, 1024, 128])
    parser.add_argument("--clips", nargs="+", default=["none", "zscore:6", "zscore:3"])
    args = parser.parse_args()
    model, tokenizer = load_model()
    ids = tokenize(tokenizer, calibration_text(), max_tokens=args.tokens)

    def measure() -> float:
        with torch.no_grad():
            return perplexity(model, ids, window=args.tokens, stride=args.tokens)

    baseline = measure()
    runs = []
    for bits, size, clip in itertools.product(args.bits, args.block_sizes, args.clips):
        row = {"bits": bits, "block_size": size, "clip": clip}
        config = QuantConfig(bits, size, clip=clip)
        for held in (False, True):
            with quantize_model(model, config, holdout=[SUPER_WEIGHT] * held):
                row["holdout" if held else "no_holdout"] = measure()
        print(row, flush=True)
        runs.append(row)
    activations = {}
    with quantize_model(model, QuantConfig(8, 128)):
        for held in (False, True):
            with quantize_activations(model, 8, holdout=[SUPER_WEIGHT] if held else None):
                activations["holdout" if held else "no_holdout"] = measure()
    print("W8A8", activations, flush=True)

    print(f"\nbaseline perplexity {baseline:.2f} on {args.tokens} tokens of calibration_text()\n")
    print("| bits | block | clip | no holdout | holdout | holdout pays |")
    print("| ---: | ---: | --- | ---: | ---: | :---: |")
    for row in runs:
        pays = "yes" if row["holdout"] < row["no_holdout"] else "no"
        print(
            f"| {row['bits']} | {row['block_size']} | {row['clip']} | "
            f"{row['no_holdout']:.1f} | {row['holdout']:.1f} | {pays} |"
        )
    print(
        f"| W8A8 (per-token A8, W8 block 128) | | | {activations['no_holdout']:.2f} | "
        f"{activations['holdout']:.2f} | |"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "model": "SmolLM2-135M-Instruct",
                "tokens": args.tokens,
                "super_weight": SUPER_WEIGHT,
                "baseline_perplexity": baseline,
                "runs": runs,
                "w8a8": activations,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
