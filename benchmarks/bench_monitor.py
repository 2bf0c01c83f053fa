"""Overhead of monitoring on a training step, recording every step.

Interleaves plain AdamW steps with monitored ones (the monitor's full per-step work:
recorder hooks, ChannelMax reduction, SpikeTracker decisions, logged values) on the same
model and data, so that load on the machine affects both alike. Prints a table and writes
``benchmarks/results/monitor.json``.

    python benchmarks/bench_monitor.py [--model tiny|smollm2] [--steps N] [--tokens T]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from sw_hooks.core.record import LOCATED_CHANNELS, record
from sw_hooks.training.metrics import ChannelMax
from sw_hooks.training.monitor import SpikeTracker, metric_values


def load(name: str):
    if name == "tiny":
        from sw_hooks.testing import planted_llama

        return planted_llama(num_layers=8).model, 256
    from sw_hooks.models import load_model

    model, tokenizer = load_model()
    return model, len(tokenizer)


def step(model, optimizer, ids) -> None:
    optimizer.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()


VARIANTS = {
    "monitored, 32 largest located (default)": LOCATED_CHANNELS,
    "monitored, every channel located (previous)": True,
    "monitored, no locations": False,
}


def monitored_step(
    model, optimizer, ids, metric: ChannelMax, tracker: SpikeTracker, n: int, locations
) -> None:
    with record(model, locations=locations) as recorder:
        step(model, optimizer, ids)
    metric.update(recorder.stats)
    stats = metric.compute_stats()
    metric.reset()
    with torch.no_grad():
        events = tracker.update(model, stats, step=n)
        metric_values(stats, tracker, tracker.current(model, stats), events)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", choices=["tiny", "smollm2"])
    parser.add_argument("--steps", type=int, default=6, help="rounds of steps timed")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, vocab = load(args.model)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    metric, tracker = ChannelMax.for_model(model), SpikeTracker()
    ids = torch.randint(0, vocab, (args.batch, args.tokens))
    step(model, optimizer, ids)  # warm-up
    monitored_step(model, optimizer, ids, metric, tracker, 0, LOCATED_CHANNELS)
    runs = {"plain": lambda n: step(model, optimizer, ids)}
    for name, locations in VARIANTS.items():
        runs[name] = lambda n, where=locations: monitored_step(
            model, optimizer, ids, metric, tracker, n + 1, where
        )
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for n in range(args.steps):
        # Rotate the order every round, so no variant always follows the same one.
        for name in names[n % len(names) :] + names[: n % len(names)]:
            start = time.perf_counter()
            runs[name](n)
            times[name].append(time.perf_counter() - start)
    plain = times.pop("plain")
    result = {
        "model": args.model,
        "batch": args.batch,
        "tokens": args.tokens,
        "steps": args.steps,
        "plain_step_s_median": statistics.median(plain),
        "variants": {
            name: {
                "step_s_median": statistics.median(t),
                "ratio_median": statistics.median(m / p for m, p in zip(t, plain, strict=True)),
            }
            for name, t in times.items()
        },
        "torch_threads": torch.get_num_threads(),
    }
    print(f"{'':<46}{'median s':>10}{'vs plain':>10}")
    print(f"{'plain AdamW step':<46}{result['plain_step_s_median']:>10.4f}{1.0:>10.4f}")
    for name, row in result["variants"].items():
        print(f"{name:<46}{row['step_s_median']:>10.4f}{row['ratio_median']:>10.4f}")
    out = Path(__file__).parent / "results" / "monitor.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
