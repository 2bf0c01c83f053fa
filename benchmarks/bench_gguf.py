"""GGUF exports of SmolLM2-135M: all quantized, super-weight tensor kept at f16, manifest patched.

For each type, on the embedded model (a Q4_1 GGUF file; its dequantized weights are the
reference), three variants loaded back through transformers:

* ``all``: every weight matrix at the type;
* ``keep f16``: the tensor holding the super weight (``blk.11.ffn_down.weight``) at f16;
* ``all + manifest``: ``all`` with the super weight's exact value written back after loading.

Each is measured on the text and windows ``sw-hooks detect`` uses (the first 1024 tokens of
the bundled pydoc text; perplexity over 512-token windows with stride 256), as perplexity
and as the mean KL divergence of its next-token distributions from the reference's.

    python benchmarks/bench_gguf.py [--type Q4_0 --type MXFP4 --type Q8_0]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from sw_hooks.analysis.impact import perplexity
from sw_hooks.export.gguf import export_gguf
from sw_hooks.export.manifest import apply_manifest, write_manifest
from sw_hooks.models import calibration_text, default_model_path, load_model, tokenize

from _common import write

# The one super weight `sw-hooks detect` verifies in SmolLM2-135M-Instruct.
SUPER = ("model.layers.11.mlp.down_proj", 507, 1229)
MAX_TOKENS = 1024  # sw-hooks detect's default --max-tokens
TEXT_CHARS = 200_000  # what sw-hooks detect reads of the bundled text
TYPES = ("Q4_0", "MXFP4", "Q8_0")


def mean_kl(reference: torch.Tensor, model: torch.nn.Module, ids: torch.Tensor) -> float:
    """Mean over positions of KL(reference || model) of the next-token distributions."""
    with torch.no_grad():
        log_q = torch.log_softmax(model(ids).logits.float(), dim=-1)
    log_p = torch.log_softmax(reference, dim=-1)
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())


def load_gguf(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, local_files_only=True
    ).eval()


def measure(model: torch.nn.Module, reference: torch.Tensor, ids: torch.Tensor) -> dict:
    return {"perplexity": perplexity(model, ids), "mean_kl": mean_kl(reference, model, ids)}


def variants(
    quant_type: str, folder: Path, manifest: Path, reference: torch.Tensor, ids: torch.Tensor
) -> dict[str, dict]:
    """The three variants of one type, each exported, loaded and measured."""
    source = default_model_path()
    rows: dict[str, dict] = {}
    for name, keep in (("all", None), ("keep f16", "f16")):
        out = folder / f"{quant_type}-{keep}.gguf"
        export = export_gguf(source, out, quant_type=quant_type, keep=keep, super_weights=[SUPER])
        model = load_gguf(out)
        rows[name] = measure(model, reference, ids) | {"bytes": export.bytes_written}
        if keep is None:
            apply_manifest(model, manifest)
            rows["all + manifest"] = measure(model, reference, ids) | {
                "bytes": export.bytes_written
            }
        out.unlink()
        print(f"  {quant_type} {name}: done", file=sys.stderr, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--type", action="append", dest="types", choices=TYPES)
    args = parser.parse_args()
    start = time.perf_counter()
    model, tokenizer = load_model()
    ids = tokenize(tokenizer, calibration_text()[:TEXT_CHARS], max_tokens=MAX_TOKENS)
    with torch.no_grad():
        reference = model(ids).logits.float()
    results: dict[str, dict] = {"reference (Q4_1 source)": {"all": measure(model, reference, ids)}}
    with tempfile.TemporaryDirectory() as folder:
        manifest = Path(folder) / "sw.json"
        write_manifest([SUPER], model, manifest, source=default_model_path())
        del model
        for quant_type in args.types or TYPES:
            results[quant_type] = variants(quant_type, Path(folder), manifest, reference, ids)
    print(table(results))
    path = write(
        "gguf",
        {
            "model": "SmolLM2-135M-Instruct (embedded Q4_1 GGUF)",
            "super_weight": list(SUPER),
            "tokens": int(ids.shape[1]),
            "seconds": round(time.perf_counter() - start, 1),
            "results": results,
        },
    )
    print(f"wrote {path}")


def table(results: dict[str, dict]) -> str:
    header = f"{'type':<24} {'variant':<16} {'perplexity':>10} {'mean KL':>9} {'MiB':>6}"
    lines = [header, "-" * len(header)]
    for quant_type, rows in results.items():
        for variant, row in rows.items():
            size = f"{row['bytes'] / 2**20:6.1f}" if "bytes" in row else f"{'-':>6}"
            lines.append(
                f"{quant_type:<24} {variant:<16} {row['perplexity']:>10.3f} "
                f"{row['mean_kl']:>9.4f} {size}"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
