"""Recording overhead on a tiny mixture-of-experts forward, against no hooks.

Runs are interleaved (plain, recorded, plain, recorded, ...) so that load on a shared
machine hits both sides alike; the median of each side is reported. Writes
``benchmarks/results/moe.json``.

    python benchmarks/bench_moe.py [--repeats 15] [--tokens 128]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from sw_hooks.moe import find_experts, record_experts
from sw_hooks.testing import tiny_moe_model


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(arch: str, implementation: str, tokens: int, repeats: int) -> dict[str, float | str]:
    model = tiny_moe_model(arch, num_layers=4)
    model.set_experts_implementation(implementation)
    ids = torch.randint(16, 256, (1, tokens), generator=torch.Generator().manual_seed(0))
    experts = find_experts(model)

    def plain() -> None:
        with torch.no_grad():
            model(ids)

    def recorded() -> None:
        with record_experts(model, experts), torch.no_grad():
            model(ids)

    plain(), recorded()  # warm-up
    base, hooked = [], []
    for _ in range(repeats):
        base.append(_time(plain))
        hooked.append(_time(recorded))
    base_ms, hooked_ms = statistics.median(base) * 1e3, statistics.median(hooked) * 1e3
    return {
        "arch": arch,
        "experts_implementation": implementation,
        "tokens": tokens,
        "no_hooks_ms": round(base_ms, 3),
        "recording_ms": round(hooked_ms, 3),
        "ratio": round(hooked_ms / base_ms, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = [
        measure(arch, implementation, args.tokens, args.repeats)
        for arch in ("mixtral", "qwen3_moe")
        for implementation in ("grouped_mm", "eager")
    ]
    print(
        f"{'arch':<10} {'experts impl':<12} {'no hooks ms':>12} {'recording ms':>13} {'ratio':>6}"
    )
    for r in rows:
        print(
            f"{r['arch']:<10} {r['experts_implementation']:<12} {r['no_hooks_ms']:>12.2f} "
            f"{r['recording_ms']:>13.2f} {r['ratio']:>6.2f}"
        )
    out = Path(__file__).parent / "results" / "moe.json"
    out.parent.mkdir(exist_ok=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "repeats": args.repeats}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
