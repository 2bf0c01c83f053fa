"""The models users bring first: their published configs, where their down-projections are,
their published super weights, and the memory to detect each one.

The configs hold the ``config.json`` values of each checkpoint that
:func:`~sw_hooks.analysis.memory_plan.memory_plan` reads; nothing is downloaded. How each
architecture's down-projections are located is tested on a tiny config of that architecture
(``tests/test_seed_models.py``); :func:`seed_table` renders the table of ``docs/models.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sw_hooks.analysis.known import known_super_weights
from sw_hooks.analysis.memory_plan import GiB, MemoryPlan, memory_plan

TABLE_TOKENS = 512
"""Tokens per forward pass in the table: one verification window."""
TABLE_STREAMS = 15
"""Residual streams held between blocks when streamed, in the table: 1024 calibration tokens
make 3 windows of 512 (stride 256), each carried for the baseline and 4 candidates."""


@dataclass(frozen=True)
class SeedModel:
    """One model of the table: its id (as in :mod:`~sw_hooks.analysis.known`), a short name,
    the dtype its checkpoint is stored in, and its config's sizes."""

    model_id: str
    name: str
    checkpoint_dtype: str
    config: Mapping[str, Any]
    down_projections: str = "model.layers.{i}.mlp.down_proj"

    def plan(self, *, tokens: int = TABLE_TOKENS, streams: int = TABLE_STREAMS) -> MemoryPlan:
        """Memory to detect it in bf16 (2 bytes per weight and activation)."""
        return memory_plan(self.config, dtype_bytes=2, tokens=tokens, streams=streams)


def _config(
    model_type: str,
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    vocab: int,
    *,
    kv_heads: int | None = None,
    tied: bool = False,
) -> dict[str, Any]:
    return {
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads or heads,
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
    }


SEED_MODELS: tuple[SeedModel, ...] = (
    SeedModel(
        "mistralai/Mistral-7B-v0.1",
        "Mistral-7B",
        "bfloat16",
        _config("mistral", 4096, 14336, 32, 32, 32000, kv_heads=8),
    ),
    SeedModel(
        "huggyllama/llama-7b", "Llama-7B", "float16", _config("llama", 4096, 11008, 32, 32, 32000)
    ),
    SeedModel(
        "huggyllama/llama-13b",
        "Llama-13B",
        "float16",
        _config("llama", 5120, 13824, 40, 40, 32000),
    ),
    SeedModel(
        "huggyllama/llama-30b",
        "Llama-30B",
        "float16",
        _config("llama", 6656, 17920, 60, 52, 32000),
    ),
    SeedModel(
        "meta-llama/Meta-Llama-3-8B",
        "Llama-3-8B",
        "bfloat16",
        _config("llama", 4096, 14336, 32, 32, 128256, kv_heads=8),
    ),
    SeedModel(
        "allenai/OLMo-1B-0724-hf",
        "OLMo-1B",
        "float32",
        _config("olmo", 2048, 8192, 16, 16, 50304, tied=True),
    ),
    SeedModel(
        "allenai/OLMo-7B-0724-hf",
        "OLMo-7B",
        "float32",
        _config("olmo", 4096, 11008, 32, 32, 50304),
    ),
    SeedModel(
        "microsoft/Phi-3-mini-4k-instruct",
        "Phi-3-mini",
        "bfloat16",
        _config("phi3", 3072, 8192, 32, 32, 32064),
    ),
)


def seed_table(*, tokens: int = TABLE_TOKENS, streams: int = TABLE_STREAMS) -> str:
    """The seed models as a Markdown table: architecture, size, down-projections, published
    super weights and the bf16 memory to detect each in memory and streamed."""
    lines = [
        "| model | architecture | parameters | checkpoint | down-projections (found by name) "
        "| published super weights `[layer, row, col]` | detect in memory | detect streamed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for seed in SEED_MODELS:
        plan = seed.plan(tokens=tokens, streams=streams)
        known = ", ".join(
            f"[{k.layer}, {k.row}, {k.col}]" for k in known_super_weights(seed.model_id)
        )
        lines.append(
            f"| {seed.name} (`{seed.model_id}`) | {seed.config['model_type']} "
            f"| {plan.parameters / 1e9:.2f} B | {seed.checkpoint_dtype} "
            f"| `{seed.down_projections}` | {known or '-'} "
            f"| {plan.in_memory_bytes / GiB:.1f} GiB | {plan.streamed_bytes / GiB:.2f} GiB |"
        )
    return "\n".join(lines)
