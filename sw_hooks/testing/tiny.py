"""Tiny randomly initialised causal LMs of real architectures, built from transformers configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

ARCHITECTURES: tuple[str, ...] = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi3",
    "olmo",
    "olmo2",
    "gpt2",
    "gpt_neox",
    "opt",
    "falcon",
)

_HIDDEN, _INTERMEDIATE, _HEADS = 64, 128, 4


def config_kwargs(arch: str, num_layers: int, vocab_size: int) -> dict[str, Any]:
    """The config of a :func:`tiny_model`: hidden 64, intermediate 128, 4 heads."""
    common = dict(
        vocab_size=vocab_size,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
    )
    llama_like = dict(
        hidden_size=_HIDDEN,
        intermediate_size=_INTERMEDIATE,
        num_hidden_layers=num_layers,
        num_attention_heads=_HEADS,
        num_key_value_heads=_HEADS,
        max_position_embeddings=512,
    )
    if arch == "gpt2":
        return common | dict(
            n_embd=_HIDDEN,
            n_inner=_INTERMEDIATE,
            n_layer=num_layers,
            n_head=_HEADS,
            n_positions=512,
        )
    if arch == "gpt_neox":
        return common | dict(
            hidden_size=_HIDDEN,
            intermediate_size=_INTERMEDIATE,
            num_hidden_layers=num_layers,
            num_attention_heads=_HEADS,
            max_position_embeddings=512,
        )
    if arch == "opt":
        return common | dict(
            hidden_size=_HIDDEN,
            ffn_dim=_INTERMEDIATE,
            num_hidden_layers=num_layers,
            num_attention_heads=_HEADS,
            word_embed_proj_dim=_HIDDEN,
            max_position_embeddings=512,
        )
    if arch == "falcon":
        return common | dict(
            hidden_size=_HIDDEN,
            ffn_hidden_size=_INTERMEDIATE,
            num_hidden_layers=num_layers,
            num_attention_heads=_HEADS,
            new_decoder_architecture=False,
            multi_query=False,
            alibi=False,
            bias=True,
        )
    if arch in ("gemma", "gemma2", "gemma3_text"):
        return common | llama_like | dict(head_dim=_HIDDEN // _HEADS)
    return common | llama_like


def tiny_model(
    arch: str = "llama",
    *,
    num_layers: int = 4,
    vocab_size: int = 256,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    overrides: dict[str, Any] | None = None,
) -> nn.Module:
    """A randomly initialised causal LM of a real architecture, small enough for unit tests.

    Hidden size 64, intermediate size 128, untied embeddings, eval mode; ``overrides``
    replaces config values (``{"num_key_value_heads": 1, "tie_word_embeddings": True}``).
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {ARCHITECTURES}")
    from transformers import AutoConfig, AutoModelForCausalLM

    values = config_kwargs(arch, num_layers, vocab_size) | (overrides or {})
    config = AutoConfig.for_model(arch, **values)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        # Unit-scale embeddings, as in trained models: with the default 0.02 the residual
        # is so small that norms amplify whatever attention leaks into it.
        if not scales_embeddings(model):
            nn.init.normal_(model.get_input_embeddings().weight, std=1.0)
    return model.to(dtype).eval()


def scales_embeddings(model: nn.Module) -> bool:
    """True for Gemma models, which multiply their embeddings by ``sqrt(hidden)`` themselves."""
    return getattr(model.config, "model_type", "").startswith("gemma")


def byte_tokenizer() -> Any:
    """A 256-token byte-level tokenizer built locally: any text, nothing downloaded.

    For tiny test models saved as checkpoints (``tokenizer.save_pretrained(folder)``), so
    that :func:`sw_hooks.models.load_model` and the CLI can load them like real ones.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=alphabet[0], eos_token=alphabet[0]
    )


def save_checkpoint(model: nn.Module, folder: str | Path) -> Path:
    """Save a tiny model as safetensors with :func:`byte_tokenizer` beside it, so that
    :func:`sw_hooks.models.load_model` and the ``sw-hooks`` command load it like a real one."""
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    byte_tokenizer().save_pretrained(folder)
    return folder
