"""Recorder overhead on SmolLM2-135M: no hooks vs the recorder vs capturing full tensors.

The recorder runs three ways: locating the 32 largest channels of each call (the default),
locating every channel (the previous default) and locating none.

One interleaved run, batch 1 x 512 tokens on the CPU; reports median paired ratios, and
the recorder's state size at 128 and 2048 tokens (it must not grow with length).

    python benchmarks/bench_record.py [--repeats 20] [--tokens 512]
"""

from __future__ import annotations

import argparse

import torch

from sw_hooks import calibration_text, find_down_projections, load_model, record, tokenize

from _common import interleaved, paired_ratio, write


class FullCapture:
    """The naive alternative: keep every down-projection input and output tensor."""

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.tensors: list[torch.Tensor] = []
        self.handles = [m.register_forward_hook(self._keep) for m in modules.values()]

    def _keep(self, module, args, output):
        self.tensors += [args[0].detach().clone(), output.detach().clone()]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=512)
    args = parser.parse_args()
    model, tokenizer = load_model()
    ids = tokenize(tokenizer, calibration_text(), max_tokens=args.tokens)
    modules = find_down_projections(model)

    def plain():
        with torch.no_grad():
            model(ids)

    def recorded():
        with record(model, modules), torch.no_grad():
            model(ids)

    def recorded_every_location():  # the previous default: a location for every channel
        with record(model, modules, locations=True), torch.no_grad():
            model(ids)

    def recorded_light():
        with record(model, modules, locations=False), torch.no_grad():
            model(ids)

    def captured():
        capture = FullCapture(modules)
        try:
            with torch.no_grad():
                model(ids)
        finally:
            capture.remove()

    variants = {
        "no hooks": plain,
        "recorder (32 largest located, default)": recorded,
        "recorder, every channel located (previous)": recorded_every_location,
        "recorder, no locations": recorded_light,
        "full capture": captured,
    }
    times = interleaved(variants, args.repeats)
    memory = {}
    for length in (128, 2048):
        long_ids = tokenize(tokenizer, calibration_text(), max_tokens=length)
        with record(model, modules) as rec, torch.no_grad():
            model(long_ids)
        capture = FullCapture(modules)
        with torch.no_grad():
            model(long_ids)
        capture.remove()
        memory[length] = {
            "recorder_bytes": sum(t.numel() * t.element_size() for t in rec.state_dict().values()),
            "full_capture_bytes": sum(t.numel() * t.element_size() for t in capture.tensors),
        }
    ratios = {
        name: paired_ratio(times, name, "no hooks") for name in variants if name != "no hooks"
    }
    medians = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    print(
        f"SmolLM2-135M forward, batch 1 x {args.tokens} tokens, {args.repeats} interleaved rounds"
    )
    print(f"{'variant':<24} {'median s':>9} {'ratio vs no hooks':>18}")
    for name in times:
        ratio = ratios.get(name, 1.0)
        print(f"{name:<24} {medians[name]:>9.4f} {ratio:>18.4f}")
    print(f"\n{'tokens':>7} {'recorder state':>15} {'full capture':>14}")
    for length, m in memory.items():
        print(
            f"{length:>7} {m['recorder_bytes'] / 1024:>12.1f} KiB {m['full_capture_bytes'] / 2**20:>10.1f} MiB"
        )
    path = write(
        "record",
        {
            "tokens": args.tokens,
            "repeats": args.repeats,
            "median_seconds": medians,
            "ratio_vs_no_hooks": ratios,
            "memory": memory,
        },
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
