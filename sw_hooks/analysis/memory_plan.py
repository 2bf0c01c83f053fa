"""The memory that detecting a model's super weights needs, computed from its config alone.

Two ways to run a model:

* **in memory**: every weight loaded at once; the peak is the weights plus one forward
  pass's activations;
* **streamed** (block-major): one decoder block loaded at a time, every stream (the
  baseline and each candidate) carried through it before the next block loads; the peak is
  the largest block, plus embeddings, final norm and head, plus the activations, which now
  include one residual stream per candidate.

Both count parameters the way the model classes of Llama, Mistral, OLMo and Phi-3 hold them
(a fused ``qkv_proj`` or ``gate_up_proj`` holds the same numbers as its parts), from the
``config.json`` keys those models use. Activation bytes are an estimate of the largest
tensors alive at once, not a measurement: the residual streams carried between blocks, one
block's attention scores and MLP intermediates, and the float32 logits of the scored
positions (the loss upcasts them).

Example:
    >>> plan = memory_plan({"hidden_size": 64, "intermediate_size": 128,
    ...     "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 256})
    >>> plan.parameters
    115008
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

GiB = 1 << 30
BF16_BYTES = 2
DEFAULT_TOKENS = 512
"""Tokens in one forward pass: :class:`~sw_hooks.analysis.options.DetectionOptions`' window."""


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only transformer with a gated MLP (gate, up, down)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    norm_weights: int = 1
    """Weights per normalisation: 1 for RMSNorm, 0 for OLMo's parameter-free LayerNorm."""

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelShape:
        """The shape a ``config.json`` (as a dict) describes.

        Raises:
            ValueError: a size this needs is missing or not a positive integer.
        """
        heads = _size(config, "num_attention_heads")
        hidden = _size(config, "hidden_size")
        return cls(
            layers=_size(config, "num_hidden_layers"),
            hidden=hidden,
            intermediate=_size(config, "intermediate_size"),
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            vocab=_size(config, "vocab_size"),
            tied=bool(config.get("tie_word_embeddings", False)),
            norm_weights=0 if config.get("model_type") == "olmo" else 1,
        )

    def block_parameters(self) -> int:
        """One decoder block: q, k, v, o projections, gate, up and down, two norms."""
        attention = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        mlp = 3 * self.hidden * self.intermediate
        return attention + mlp + 2 * self.norm_weights * self.hidden

    def embedding_parameters(self) -> int:
        return self.vocab * self.hidden

    def head_parameters(self) -> int:
        """The LM head and the final norm (the head shares the embedding when tied)."""
        return (0 if self.tied else self.vocab * self.hidden) + self.norm_weights * self.hidden

    def parameters(self) -> int:
        return (
            self.layers * self.block_parameters()
            + self.embedding_parameters()
            + self.head_parameters()
        )


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes to detect one model: weights, activations, and the peak of each mode."""

    parameters: int
    weight_bytes: int
    largest_block_bytes: int
    embedding_and_head_bytes: int
    in_memory_activation_bytes: int
    streamed_activation_bytes: int

    @property
    def in_memory_bytes(self) -> int:
        """Peak in memory: every weight plus one forward pass's activations."""
        return self.weight_bytes + self.in_memory_activation_bytes

    @property
    def streamed_bytes(self) -> int:
        """Peak streamed: the largest block, embeddings and head, and every stream's state."""
        return (
            self.largest_block_bytes
            + self.embedding_and_head_bytes
            + self.streamed_activation_bytes
        )

    def streamed_bytes_read(self, passes: int) -> int:
        """Bytes read from the checkpoint by ``passes`` block-major passes (embeddings and
        head read once, every block once per pass)."""
        blocks = self.weight_bytes - self.embedding_and_head_bytes
        return self.embedding_and_head_bytes + passes * blocks


def memory_plan(
    config: Mapping[str, Any],
    *,
    dtype_bytes: int = BF16_BYTES,
    tokens: int = DEFAULT_TOKENS,
    streams: int = 1,
) -> MemoryPlan:
    """The memory detection needs for the model ``config`` describes.

    Args:
        config: a ``config.json`` as a dict (Llama, Mistral, OLMo, Phi-3 keys).
        dtype_bytes: bytes per weight and activation (2 for bf16/fp16, 4 for float32).
        tokens: tokens in one forward pass.
        streams: residual streams carried between blocks when streamed: the baseline plus
            each candidate measured in the same pass.
    """
    if dtype_bytes < 1 or tokens < 1 or streams < 1:
        raise ValueError("dtype_bytes, tokens and streams must be positive")
    shape = ModelShape.from_config(config)
    block = shape.block_parameters() * dtype_bytes
    ends = (shape.embedding_parameters() + shape.head_parameters()) * dtype_bytes
    return MemoryPlan(
        parameters=shape.parameters(),
        weight_bytes=shape.parameters() * dtype_bytes,
        largest_block_bytes=block,
        embedding_and_head_bytes=ends,
        in_memory_activation_bytes=activation_bytes(shape, tokens, dtype_bytes, 1),
        streamed_activation_bytes=activation_bytes(shape, tokens, dtype_bytes, streams),
    )


def activation_bytes(shape: ModelShape, tokens: int, dtype_bytes: int, streams: int) -> int:
    """The largest activations alive at once: ``streams`` residual states of ``tokens``
    positions, one block's working tensors for one stream (q, k, v, attention output, the
    eager attention scores, three MLP intermediates) and the float32 logits."""
    residual = streams * tokens * shape.hidden * dtype_bytes
    attention = tokens * shape.head_dim * (2 * shape.heads + 2 * shape.kv_heads) * dtype_bytes
    scores = shape.heads * tokens * tokens * dtype_bytes
    mlp = 3 * tokens * shape.intermediate * dtype_bytes
    logits = tokens * shape.vocab * 4
    return residual + attention + scores + mlp + logits


def _size(config: Mapping[str, Any], key: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"config needs {key} as a positive integer, got {value!r}")
    return value
