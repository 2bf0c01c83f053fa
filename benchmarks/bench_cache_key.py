"""The conversion cache's key: a full content digest of the GGUF file vs converting it.

One interleaved run on the embedded SmolLM2-135M file: ``entry_key`` (a BLAKE2 digest of
every byte, what each load now pays before it reads the cached copy), the previous key
(size, time and the first MiB only, which served stale weights for a file rewritten past
its first MiB with its size and time kept), and the conversion the cache saves
(``load_model(cache=False)``).

    python benchmarks/bench_cache_key.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import hashlib
import statistics

import torch

from sw_hooks.model_cache import entry_key
from sw_hooks.models import default_model_path, load_model

from _common import interleaved, paired_ratio, write


def previous_key(path) -> str:
    """The key before: size, modification time and a hash of the first MiB."""
    stat = path.stat()
    digest = hashlib.blake2b(digest_size=10)
    digest.update(f"{stat.st_size}|{stat.st_mtime_ns}|".encode())
    with path.open("rb") as handle:
        digest.update(handle.read(1 << 20))
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    source = default_model_path()
    variants = {
        "convert the GGUF file (what the cache saves)": lambda: load_model(cache=False),
        "full content digest (the key now)": lambda: entry_key(source, torch.float32),
        "size + time + first MiB (previous key)": lambda: previous_key(source),
    }
    times = interleaved(variants, args.repeats, warmup=1)
    baseline = next(iter(variants))
    rows = {
        name: {
            "seconds_median": statistics.median(t),
            "vs_conversion": paired_ratio(times, name, baseline),
        }
        for name, t in times.items()
    }
    size = source.stat().st_size
    print(f"{source.name}: {size / 2**20:.1f} MiB")
    for name, row in rows.items():
        print(f"{name:<48}{row['seconds_median']:>9.3f} s  x{row['vs_conversion']:.4f}")
    path = write(
        "cache_key",
        {"file": source.name, "bytes": size, "repeats": args.repeats, "variants": rows},
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
