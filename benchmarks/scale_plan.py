"""Checkpoint bytes each way of running detection reads, for each seed model, from its config alone.

Sizes come from :func:`sw_hooks.analysis.memory_plan.memory_plan` (bf16) of each
:data:`sw_hooks.analysis.seed_models.SEED_MODELS` config. What is read depends on the run;
the table assumes the common one: the CLI's defaults (1024 calibration tokens: 3 windows of
512, stride 256, so screening applies; a 128-token prompt), two record passes (the second
finds nothing new) and one candidate, at the model's first published super-weight layer
``L`` of ``n`` blocks (``f = (n - L) / n``: the share of blocks from ``L`` on). With ``B``
the bytes of all blocks and ``E`` those of embeddings, final norm and head:

* **in memory**: every weight once: ``E + B``;
* **streamed** (``--stream``): ``E`` once, every block once per sweep: record pass 1 (all
  blocks), pass 2 (from ``L``), verification window 1, windows 2-3: ``E + B (3 + f)``
  (and the spiking down-projections once per pass, a few MB);
* **accelerate disk offload** (``--device-map`` with the blocks on ``"disk"``): every block a
  forward runs is read at that forward: 2 record passes (full forwards), the prefix-replay
  check (two full forwards, then one from ``L``), then per window the baseline (full), the
  candidate and all candidates together (from ``L`` each): ``E + B (2 + (2 + f) + 3 (1 + 2f))``.

    python benchmarks/scale_plan.py   # prints the Markdown table of docs/scale.md
"""

from __future__ import annotations

from sw_hooks.analysis.known import known_super_weights
from sw_hooks.analysis.seed_models import SEED_MODELS

GB = 1e9
WINDOWS = 3


def bytes_read(ends: int, blocks: int, layer: int, layers: int) -> dict[str, float]:
    """``{mode: bytes read}`` under the assumptions of this module's docstring."""
    f = (layers - layer) / layers
    return {
        "in memory": ends + blocks,
        "streamed": ends + blocks * (3 + f),
        "disk offload": ends + blocks * (2 + (2 + f) + WINDOWS * (1 + 2 * f)),
    }


def table() -> str:
    lines = [
        "| model | bf16 weights | L / n | read in memory | read streamed | read with disk offload |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for seed in SEED_MODELS:
        plan = seed.plan()
        layers = int(seed.config["num_hidden_layers"])
        layer = min(k.layer for k in known_super_weights(seed.model_id))
        ends = plan.embedding_and_head_bytes
        read = bytes_read(ends, plan.weight_bytes - ends, layer, layers)
        lines.append(
            f"| {seed.name} | {plan.weight_bytes / GB:.1f} GB | {layer} / {layers} "
            f"| {read['in memory'] / GB:.1f} GB | {read['streamed'] / GB:.1f} GB "
            f"| {read['disk offload'] / GB:.1f} GB |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
