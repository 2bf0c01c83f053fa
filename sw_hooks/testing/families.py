"""Tiny models of many families (encoders, vision, encoder-decoders, hybrids, hand-written)
and a planting that works on any of them: a spike pair, or a decoy without a spike.

:func:`tiny_family` builds a randomly initialised base model (no task head) from its
transformers config class. :func:`plant_spike_pair` makes ``weight[row, col]`` of one MLP
output projection the weight behind a spike pair, whatever the family: the linears feeding
that projection's input channel ``col`` (found from the data flow, so fused ``gate_up``
layouts work too) are turned to read one input direction strongly, so the channel spikes
on every token aligned with it; ``weight[:, col]`` is cleared but for ``row``, so the
output spikes at ``row``. :func:`plant_decoy` only makes a weight large: its input channel
stays ordinary, so there is no activation spike to find.

With ``on_every_token=True`` the channel reads the mean direction of its input over all
tokens instead, so it spikes on every token and the super activation rides the whole
sequence into the output: removing the weight then changes what any loss on the output sees
(:mod:`sw_hooks.analysis.losses`). :func:`wire_head` makes a task head (classifier, masked-LM
head) read the super activation's row as one class or token, as
:func:`~sw_hooks.testing.planting.wire_lm_head` does for causal LMs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sw_hooks.core.access import oriented_weight
from sw_hooks.core.locate import layer_index
from sw_hooks.core.structure import example_input, feeding_linears

_HIDDEN, _INTERMEDIATE, _HEADS = 64, 128, 4
_TOKENS = dict(vocab_size=256, pad_token_id=0, bos_token_id=0, eos_token_id=0)


def _text(layers: int) -> dict[str, Any]:
    return dict(
        hidden_size=_HIDDEN,
        intermediate_size=_INTERMEDIATE,
        num_hidden_layers=layers,
        num_attention_heads=_HEADS,
    )


def _family_configs(layers: int) -> dict[str, tuple[str, str, dict[str, Any]]]:
    """``family: (model class, config class, config arguments)`` from transformers."""
    return {
        "bert": ("BertModel", "BertConfig", _TOKENS | _text(layers)),
        "roberta": ("RobertaModel", "RobertaConfig", _TOKENS | _text(layers)),
        "modernbert": (
            "ModernBertModel",
            "ModernBertConfig",
            _TOKENS | _text(layers) | dict(cls_token_id=0, sep_token_id=0),
        ),
        "vit": ("ViTModel", "ViTConfig", _text(layers) | dict(image_size=16, patch_size=4)),
        "clip_text": ("CLIPTextModel", "CLIPTextConfig", _TOKENS | _text(layers)),
        "t5": (
            "T5Model",
            "T5Config",
            _TOKENS
            | dict(d_model=_HIDDEN, d_ff=_INTERMEDIATE, d_kv=16, num_heads=_HEADS)
            | dict(num_layers=layers, decoder_start_token_id=0),
        ),
        "whisper": (
            "WhisperModel",
            "WhisperConfig",
            _TOKENS
            | dict(d_model=_HIDDEN, encoder_ffn_dim=_INTERMEDIATE, decoder_ffn_dim=_INTERMEDIATE)
            | dict(encoder_layers=layers, decoder_layers=layers, decoder_start_token_id=1)
            | dict(encoder_attention_heads=_HEADS, decoder_attention_heads=_HEADS)
            | dict(num_mel_bins=8, max_source_positions=16, max_target_positions=32),
        ),
        "gptj": (
            "GPTJModel",
            "GPTJConfig",
            _TOKENS
            | dict(n_embd=_HIDDEN, n_inner=_INTERMEDIATE, n_layer=layers, n_head=_HEADS)
            | dict(rotary_dim=8, n_positions=64),
        ),
        "bloom": (
            "BloomModel",
            "BloomConfig",
            _TOKENS | dict(hidden_size=_HIDDEN, n_layer=layers, n_head=_HEADS),
        ),
        "phi": ("PhiModel", "PhiConfig", _TOKENS | _text(layers)),
        "deepseek_v3": (
            "DeepseekV3Model",
            "DeepseekV3Config",
            _TOKENS
            | _text(layers)
            | dict(num_key_value_heads=_HEADS, first_k_dense_replace=layers - 1)
            | dict(n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1)
            | dict(moe_intermediate_size=32, n_shared_experts=1, q_lora_rank=32)
            | dict(kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16),
        ),
        "bamba": (
            "BambaModel",
            "BambaConfig",
            _TOKENS
            | _text(layers)
            | dict(num_key_value_heads=_HEADS, attn_layer_indices=[layers - 1])
            | dict(mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=16)
            | dict(mamba_chunk_size=8, mamba_expand=2),
        ),
    }


FAMILIES: tuple[str, ...] = (*_family_configs(2), "hand_written")


class HandWrittenBlock(nn.Module):
    """A pre-norm transformer block whose module names no table knows."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.norm_a, self.norm_b = nn.LayerNorm(width), nn.LayerNorm(width)
        self.mix = nn.MultiheadAttention(width, _HEADS, batch_first=True)
        self.widen, self.narrow = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm_a(x)
        x = x + self.mix(y, y, y, need_weights=False)[0]
        return x + self.narrow(torch.relu(self.widen(self.norm_b(x))))


class HandWritten(nn.Module):
    """Token embedding, ``blocks`` of :class:`HandWrittenBlock`, a final norm; no config."""

    def __init__(self, layers: int = 2, vocab_size: int = 256) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, _HIDDEN)
        self.blocks = nn.ModuleList(HandWrittenBlock(_HIDDEN, _INTERMEDIATE) for _ in range(layers))
        self.out_norm = nn.LayerNorm(_HIDDEN)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tokens(ids)
        for block in self.blocks:
            x = block(x)
        return self.out_norm(x)


def tiny_family(family: str, *, num_layers: int = 4, seed: int = 0) -> nn.Module:
    """A randomly initialised base model of ``family`` (one of :data:`FAMILIES`), eval mode.

    Hidden size 64, intermediate size 128 (DeepSeek-V3: the last layer is mixture-of-experts,
    the others dense; Bamba: the last layer has attention, the others Mamba-2).

    Example:
        >>> type(tiny_family("vit", num_layers=1)).__name__
        'ViTModel'
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")
    import transformers

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if family == "hand_written":
            return HandWritten(num_layers).eval()
        model_class, config_class, kwargs = _family_configs(num_layers)[family]
        config = getattr(transformers, config_class)(**kwargs)
        return getattr(transformers, model_class)(config).eval()


def family_input(model: nn.Module) -> dict[str, torch.Tensor]:
    """What to call a :func:`tiny_family` model with (``ids=`` for the hand-written one)."""
    if isinstance(model, HandWritten):
        return {"ids": torch.arange(2, 10)[None]}
    return example_input(model)


@dataclass(frozen=True)
class PlantedPair:
    """A weight planted by :func:`plant_spike_pair` or :func:`plant_decoy`, ``[out, in]``."""

    module: str
    layer: int | None
    row: int
    col: int
    value: float


def plant_spike_pair(
    model: nn.Module,
    module: str,
    row: int,
    col: int,
    *,
    value: float = 8.0,
    drive: float | None = None,
    on_every_token: bool = False,
) -> PlantedPair:
    """Make ``module.weight[row, col]`` (``[out, in]``) the weight of a spike pair.

    Every linear feeding input channel ``col`` of ``module`` reads, scaled by ``drive``, the
    unit direction of its own input on the loudest token of :func:`family_input` (bias
    cleared), so that channel spikes there; ``weight[:, col]`` is zero but for
    ``weight[row, col] = value``. ``on_every_token=True`` reads the mean direction of the
    input over all tokens instead, so the channel spikes on every token of
    :func:`family_input` and the weight matters to the model's output. ``drive`` defaults
    to 4, or 8 on every token (the mean direction is less aligned with each token than the
    loudest token's own is with it).
    """
    drive = drive if drive is not None else (8.0 if on_every_token else 4.0)
    feeding = feeding_linears(model, module, family_input(model))
    width = oriented_weight(model.get_submodule(module)).shape[1]
    direction = _input_direction(model, model.get_submodule(feeding[0]), on_every_token)
    with torch.no_grad():
        for name in feeding:
            _drive_rows(model.get_submodule(name), col, width, drive * direction)
        weight = oriented_weight(model.get_submodule(module))
        weight[:, col] = 0
        weight[row, col] = value
    return PlantedPair(module, layer_index(module), row, col, value)


def plant_decoy(
    model: nn.Module, module: str, row: int, col: int, value: float = 8.0
) -> PlantedPair:
    """Make ``module.weight[row, col]`` large with nothing driving its input channel."""
    with torch.no_grad():
        oriented_weight(model.get_submodule(module))[row, col] = value
    return PlantedPair(module, layer_index(module), row, col, value)


def _input_direction(model: nn.Module, linear: nn.Module, mean: bool) -> torch.Tensor:
    """The unit direction of ``linear``'s input on the token where it is largest, or (``mean``)
    of the mean of its tokens' unit directions, which every token leans towards."""
    seen: list[torch.Tensor] = []
    handle = linear.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    try:
        with torch.no_grad():
            model(**family_input(model))
    finally:
        handle.remove()
    tokens = seen[0].reshape(-1, seen[0].shape[-1]).float()
    if mean:
        chosen = (tokens / tokens.norm(dim=-1, keepdim=True)).mean(0)
    else:
        chosen = tokens[tokens.norm(dim=-1).argmax()]
    return chosen / chosen.norm()


def _drive_rows(linear: nn.Module, col: int, width: int, row_value: torch.Tensor) -> None:
    """Set every output row of ``linear`` that lands on channel ``col`` (fused layouts put
    ``col``, ``col + width``, ... of a ``k * width``-wide output there)."""
    weight = oriented_weight(linear)
    bias = getattr(linear, "bias", None)
    for out_row in range(col, weight.shape[0], width):
        weight[out_row] = row_value.to(weight.dtype)
        if isinstance(bias, torch.Tensor):
            bias[out_row] = 0


def wire_head(model: nn.Module, row: int, target: int) -> None:
    """Let the model's task head read hidden ``row`` only, as class or token ``target``.

    The head is the output embeddings (a masked-LM decoder) or a linear ``classifier``; a
    BERT-style prediction transform before it (``cls.predictions.transform``) passes ``row``
    through unchanged.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = head if isinstance(head, nn.Linear) else getattr(model, "classifier", None)
    if not isinstance(head, nn.Linear):
        raise ValueError(f"{type(model).__name__} has no linear head to wire")
    with torch.no_grad():
        transform = _prediction_transform(model)
        if transform is not None:
            transform.weight[:, row] = 0
            transform.weight[row] = 0
            transform.weight[row, row] = 1.0
        head.weight[:, row] = 0
        head.weight[target, row] = 4.0


def _prediction_transform(model: nn.Module) -> nn.Linear | None:
    for name, module in model.named_modules():
        if name.endswith("predictions.transform.dense") and isinstance(module, nn.Linear):
            return module
    return None
