"""Overhead of monitoring on a training step, recording every step; the cost of verification.

Interleaves plain AdamW steps with monitored ones (the monitor's full per-step work:
recorder hooks, ChannelMax reduction, SpikeTracker decisions, logged values) on the same
model and data, so that load on the machine affects both alike. Prints a table and writes
``benchmarks/results/monitor.json``.

``--verify`` instead measures what verification on the fly costs: the candidates one
recording finds, each measured once on a held-out batch (what the monitor does at the first
recording), interleaved with plain AdamW steps; the cost is given as a share of a short
epoch of ``--epoch-steps`` plain steps. Writes ``benchmarks/results/monitor_verify.json``.

    python benchmarks/bench_monitor.py [--model tiny|smollm2] [--steps N] [--tokens T]
    python benchmarks/bench_monitor.py --verify [--epoch-steps 100] [--held-out 4x128]
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


def verification_cost(model, vocab: int, args: argparse.Namespace) -> dict:
    """Seconds to measure one recording's candidates, against plain steps, interleaved."""
    from sw_hooks.training.verification import CandidateVerifier

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, vocab, (args.batch, args.tokens))
    rows, length = (int(n) for n in args.held_out.split("x"))
    held_out = torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(1))
    with record(model) as recorder:
        step(model, optimizer, ids)  # warm-up, and the recording the candidates come from
    tracker = SpikeTracker()
    with torch.no_grad():
        tracker.update(model, recorder.stats, step=0)
    candidates = tracker.candidates
    plain, verify, measured = [], [], candidates
    for _ in range(args.steps):
        start = time.perf_counter()
        step(model, optimizer, ids)
        plain.append(time.perf_counter() - start)
        start = time.perf_counter()
        measured = CandidateVerifier(calibration=held_out).measure(model, candidates)
        verify.append(time.perf_counter() - start)
    plain_s, verify_s = statistics.median(plain), statistics.median(verify)
    return {
        "model": args.model,
        "batch": args.batch,
        "tokens": args.tokens,
        "held_out": [rows, length],
        "rounds": args.steps,
        "candidates": [w.label for w in measured],  # random ids: their impacts mean nothing
        "plain_step_s_median": plain_s,
        "verify_s_median": verify_s,
        "verify_in_plain_steps": verify_s / plain_s,
        "epoch_steps": args.epoch_steps,
        "share_of_epoch": verify_s / (verify_s + args.epoch_steps * plain_s),
        "torch_threads": torch.get_num_threads(),
    }


def print_verification(result: dict) -> None:
    print(f"candidates measured: {', '.join(result['candidates'])}")
    print(f"{'plain AdamW step (median s)':<44}{result['plain_step_s_median']:>10.3f}")
    print(f"{'verify one recording (median s)':<44}{result['verify_s_median']:>10.3f}")
    print(f"{'  in plain steps':<44}{result['verify_in_plain_steps']:>10.2f}")
    share = f"  share of a {result['epoch_steps']}-step epoch"
    print(f"{share:<44}{100 * result['share_of_epoch']:>9.2f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", choices=["tiny", "smollm2"])
    parser.add_argument("--steps", type=int, default=6, help="rounds of steps timed")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--verify", action="store_true", help="the cost of verification")
    parser.add_argument("--epoch-steps", type=int, default=100)
    parser.add_argument("--held-out", default="4x128", help="held-out batch, ROWSxTOKENS")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, vocab = load(args.model)
    model.train()
    if args.verify:
        result = verification_cost(model, vocab, args)
        print_verification(result)
        out = Path(__file__).parent / "results" / "monitor_verify.json"
        out.write_text(json.dumps(result, indent=2) + "\n")
        return
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
