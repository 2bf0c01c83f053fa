"""Expert recording overhead at OLMoE-1B-7B's expert shape, recording from the kernel vs recomputing.

The model is OLMoE-shaped with random weights: 64 experts, top-8, hidden 2048, expert
width 1024, a few layers, a small vocabulary; one batch of 512 tokens. Three variants run
in one interleaved loop (order rotating each round): a plain forward, recording as
``record_experts`` does it (read from the experts' own kernel), and recording by
recomputing every routed expert in a forward hook (the former path, kept as
``ExpertRecorder(..., _recompute=True)``). Ratios are medians of per-round ratios to the
plain forward of the same round. Writes ``benchmarks/results/moe.json``.

    python benchmarks/bench_moe.py [--repeats 7] [--layers 2] [--tokens 512]
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, OlmoeConfig

from sw_hooks.core.experts import find_experts
from sw_hooks.core.record import ExpertRecorder

from _common import interleaved, paired_ratio, write

VARIANTS = ("plain", "record_experts", "recompute (before)")


def olmoe_shaped(layers: int) -> torch.nn.Module:
    """OLMoE-1B-7B's layer shape with random weights and a 1024-token vocabulary."""
    config = OlmoeConfig(
        vocab_size=1024,
        hidden_size=2048,
        intermediate_size=1024,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        num_experts=64,
        num_experts_per_tok=8,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def measure(
    model: torch.nn.Module, implementation: str, ids: torch.Tensor, repeats: int
) -> dict[str, object]:
    model.set_experts_implementation(implementation)
    experts = find_experts(model)

    def plain() -> None:
        with torch.no_grad():
            model(ids)

    def recorded(recompute: bool) -> None:
        with ExpertRecorder(model, experts, _recompute=recompute), torch.no_grad():
            model(ids)

    times = interleaved(
        {
            "plain": plain,
            "record_experts": lambda: recorded(False),
            "recompute (before)": lambda: recorded(True),
        },
        repeats,
        warmup=1,
    )
    medians = {name: sorted(t)[len(t) // 2] * 1e3 for name, t in times.items()}
    return {
        "experts_implementation": implementation,
        "median_ms": {name: round(ms, 1) for name, ms in medians.items()},
        "ratio_to_plain": {
            name: round(paired_ratio(times, name, "plain"), 3) for name in VARIANTS[1:]
        },
        "rounds_ms": {name: [round(t * 1e3, 1) for t in times[name]] for name in VARIANTS},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--implementations", nargs="+", default=["grouped_mm", "eager"])
    args = parser.parse_args()
    model = olmoe_shaped(args.layers)
    ids = torch.randint(0, 1024, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    rows = [measure(model, impl, ids, args.repeats) for impl in args.implementations]
    print(
        f"OLMoE-shaped ({args.layers} layers, 64 experts top-8, hidden 2048, width 1024), "
        f"1 x {args.tokens} tokens, {args.repeats} interleaved rounds"
    )
    print(f"{'experts impl':<12} {'variant':<20} {'median ms':>10} {'x plain':>8}")
    for row in rows:
        for name in VARIANTS:
            ratio = row["ratio_to_plain"].get(name, 1.0)
            print(
                f"{row['experts_implementation']:<12} {name:<20} "
                f"{row['median_ms'][name]:>10.1f} {ratio:>8.3f}"
            )
    shape = {
        "model": "OLMoE-1B-7B layer shape, random weights",
        "layers": args.layers,
        "experts": 64,
        "top_k": 8,
        "hidden": 2048,
        "expert_width": 1024,
        "tokens": args.tokens,
        "repeats": args.repeats,
        "ratio": "median over rounds of variant / plain in the same round",
    }
    print(f"wrote {write('moe', {'setup': shape, 'rows': rows})}")


if __name__ == "__main__":
    main()
