"""A tiny llama written as an F32 GGUF file, as llama.cpp's converter lays it out.

With a 256-token byte-level vocabulary, so that transformers loads the model and its
tokenizer from the one local file: the ``sw-hooks`` commands take it like a real GGUF model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from torch import nn


def _byte_alphabet() -> list[str]:
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def _permuted(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order for q/k (transformers undoes it when loading)."""
    rows = weight.shape[0]
    return (
        weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def write_hyperparameters(writer: Any, config: Any) -> None:
    """The shape keys every llama-architecture GGUF file carries, from a transformers config."""
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)


def write_out(writer: Any) -> None:
    """Header, metadata and tensors to the file, in the order gguf requires, then close it."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _write_metadata(writer: Any, config: Any) -> None:
    write_hyperparameters(writer, config)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(_byte_alphabet())
    writer.add_token_types([1] * config.vocab_size)
    writer.add_token_scores([0.0] * config.vocab_size)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)


def save_gguf(
    model: nn.Module, path: str | Path, extra: dict[str, np.ndarray] | None = None
) -> Path:
    """Write a tiny llama (:func:`~sw_hooks.testing.tiny_model`) as an F32 GGUF file.

    ``extra`` tensors are written as given, under their GGUF names. Needs ``gguf``
    (``pip install "sw_hooks[gguf]"``).
    """
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    _write_metadata(writer, config)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        data = tensor.float().numpy()
        if ".q_proj." in name:
            data = _permuted(data, config.num_attention_heads)
        elif ".k_proj." in name:
            data = _permuted(data, config.num_key_value_heads)
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight",)), data)
    for name, data in (extra or {}).items():
        writer.add_tensor(name, data)
    write_out(writer)
    return Path(path)
