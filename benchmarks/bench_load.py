"""Loading the embedded SmolLM2-135M: converting the GGUF file every time vs the cached copy.

One interleaved run: ``load_model(cache=False)`` (dequantize the GGUF file and rebuild the
tokenizer, as every load did before the cache) against ``load_model()`` reading the
safetensors copy (written once, before the timed rounds, into a temporary cache folder).
Also times the first, converting load that fills the cache.

    python benchmarks/bench_load.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

from sw_hooks.model_cache import CACHE_DIR_ENV
from sw_hooks.models import load_model

from _common import interleaved, paired_ratio, time_call, write


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        os.environ[CACHE_DIR_ENV] = folder
        first = time_call(load_model)  # converts and writes the copy
        variants = {
            "convert the GGUF file (no cache, previous)": lambda: load_model(cache=False),
            "read the cached copy": load_model,
        }
        times = interleaved(variants, args.repeats, warmup=0)
    rows = {
        name: {
            "seconds_median": statistics.median(t),
            "vs_previous": paired_ratio(times, name, next(iter(variants))),
        }
        for name, t in times.items()
    }
    print(f"first load, converting and writing the cache: {first:.1f} s")
    for name, row in rows.items():
        print(f"{name:<44}{row['seconds_median']:>8.2f} s  x{row['vs_previous']:.3f}")
    path = write("load", {"first_load_seconds": first, "repeats": args.repeats, "variants": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
