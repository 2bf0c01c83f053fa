"""Loading: time of the embedded GGUF model with and without its cached copy, and the peak
memory of loading a bf16 checkpoint in its own dtype against the float32 copy.

Time, one interleaved run: ``load_model(cache=False)`` (dequantize the GGUF file and rebuild
the tokenizer, as every load did before the cache) against ``load_model()`` reading the
safetensors copy (written once, before the timed rounds, into a temporary cache folder).
Also times the first, converting load that fills the cache.

Memory: a 118 M-parameter Llama (hidden 768, 8 layers, vocabulary 32000) saved as bf16
safetensors (237 MB). Each load runs in a fresh process, rounds interleaved:
``load_model(folder, dtype="float32")`` (what every load did before: a float32 copy)
against ``load_model(folder)`` (its own dtype, the default now), each followed by one
forward pass so that every weight has been read. The peak is the kernel's high-water mark of
the process's resident memory (``VmHWM``, reset after the imports), less the resident memory
before loading; it counts the checkpoint's pages mapped from the page cache as well as
copies. Also sampled every millisecond: the peak of anonymous memory (copies only).

    python benchmarks/bench_load.py [--repeats 3] [--memory-repeats 2] [--skip-gguf]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from sw_hooks.model_cache import CACHE_DIR_ENV
from sw_hooks.models import load_model

from _common import RESULTS, interleaved, paired_ratio, time_call, write

MEMORY_VARIANTS = {
    "float32 copy (previous default)": "float32",
    "own dtype, bf16 (auto, default)": "auto",
}
CHILD = r"""
import gc, json, sys, threading, time
import torch
from sw_hooks.models import load_model

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise KeyError(key)

folder, warmup, dtype = sys.argv[1], sys.argv[2], sys.argv[3]
# A tiny checkpoint of the same architecture first: imports, tokenizer and kernels are then
# paid for, so what follows is what the model's size costs.
tiny, _ = load_model(warmup, dtype=dtype)
with torch.no_grad():
    tiny(torch.arange(64)[None])
del tiny
gc.collect()
before_rss, before_anon = status("VmRSS"), status("RssAnon")
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")  # reset VmHWM to the current resident size
anon_peak, done = [before_anon], []

def sample():
    while not done:
        anon_peak[0] = max(anon_peak[0], status("RssAnon"))
        time.sleep(0.001)

sampler = threading.Thread(target=sample)
sampler.start()
model, _ = load_model(folder, dtype=dtype)
with torch.no_grad():
    model(torch.arange(64)[None])
done.append(True)
sampler.join()
tensors = [*model.parameters(), *model.buffers()]
loaded = sum(t.numel() * t.element_size() for t in tensors)
print(json.dumps({
    "dtype": str(model.dtype), "loaded_bytes": loaded,
    "peak_bytes": status("VmHWM") - before_rss, "peak_anon_bytes": anon_peak[0] - before_anon,
}))
"""


def save_bf16_checkpoint(folder: Path, *, tiny: bool = False) -> Path:
    """A randomly initialised 118 M-parameter Llama saved as bf16 safetensors (``tiny``: a
    0.1 M-parameter one of the same architecture, for warming up)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from sw_hooks.testing import save_checkpoint

    sizes = (256, 64, 128, 2, 4, 2) if tiny else (32000, 768, 3072, 8, 12, 4)
    vocab, hidden, intermediate, layers, heads, kv_heads = sizes
    config = AutoConfig.for_model(
        "llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        tie_word_embeddings=False, max_position_embeddings=512,
        pad_token_id=0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return save_checkpoint(model, folder)


def measure_child(folder: Path, warmup: Path, dtype: str) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder), str(warmup), dtype],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory_rows(repeats: int) -> dict[str, dict[str, object]]:
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = save_bf16_checkpoint(Path(folder) / "model")
        warmup = save_bf16_checkpoint(Path(folder) / "tiny", tiny=True)
        file_bytes = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in MEMORY_VARIANTS}
        for round_index in range(repeats):
            names = list(MEMORY_VARIANTS)
            order = names[round_index % 2 :] + names[: round_index % 2]
            for name in order:
                runs[name].append(measure_child(checkpoint, warmup, MEMORY_VARIANTS[name]))
    rows = {}
    for name, results in runs.items():
        peak = statistics.median(r["peak_bytes"] for r in results)
        anon = statistics.median(r["peak_anon_bytes"] for r in results)
        loaded = results[0]["loaded_bytes"]
        rows[name] = {
            "dtype": results[0]["dtype"],
            "loaded_bytes": loaded,
            "checkpoint_bytes": file_bytes,
            "peak_bytes": peak,
            "peak_over_loaded": peak / loaded,
            "peak_anon_bytes": anon,
            "peak_anon_over_loaded": anon / loaded,
            "runs": results,
        }
        print(
            f"{name:<34} {results[0]['dtype']:<15} loaded {loaded / 2**20:6.0f} MiB  "
            f"peak {peak / 2**20:6.0f} MiB = x{peak / loaded:.2f} of loaded  "
            f"(anonymous {anon / 2**20:5.0f} MiB = x{anon / loaded:.2f})"
        )
    return rows


def gguf_rows(repeats: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as folder:
        os.environ[CACHE_DIR_ENV] = folder
        first = time_call(load_model)  # converts and writes the copy
        variants = {
            "convert the GGUF file (no cache, previous)": lambda: load_model(cache=False),
            "read the cached copy": load_model,
        }
        times = interleaved(variants, repeats, warmup=0)
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
    return {"first_load_seconds": first, "repeats": repeats, "variants": rows}


def _previous() -> dict[str, object]:
    """The last results without their environment, so that ``--skip-gguf`` keeps the times."""
    try:
        previous = json.loads((RESULTS / "load.json").read_text())
    except (OSError, ValueError):
        return {}
    previous.pop("environment", None)
    return previous


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-repeats", type=int, default=2)
    parser.add_argument("--skip-gguf", action="store_true", help="measure memory only")
    args = parser.parse_args()
    payload = _previous() if args.skip_gguf else {}
    payload["memory"] = memory_rows(args.memory_repeats)
    if not args.skip_gguf:
        payload |= gguf_rows(args.repeats)
    path = write("load", payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
