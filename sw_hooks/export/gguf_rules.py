"""Which GGUF tensors a quantized export may quantize: the rules ``llama-quantize`` follows.

``llama-quantize`` leaves some weights at their source type whatever the target type:
norms, tensors of one dimension, the mixture-of-experts router (``ffn_gate_inp``), position
and token-type embeddings, and a list of small or structurally sensitive tensors of
particular architectures. An exported file that quantizes one of them is not what llama.cpp
would have written, and a router rounded to 4 bits sends tokens to other experts.
:func:`allows_quantization` applies the same rules, by tensor name and shape, so that
:func:`sw_hooks.export.gguf.export_gguf` writes the files ``llama-quantize`` would.
"""

from __future__ import annotations

from collections.abc import Sequence

# Tensors kept at their source type wherever the name contains one of these: routers and
# routing tables, tiny per-layer projections, convolutions of state-space layers, RWKV's small
# mixing weights, relative-position biases and the vision and audio encoders' position,
# patch and codebook tensors.
_NEVER_QUANTIZED_PARTS: tuple[str, ...] = (
    "_norm.weight",
    "ffn_gate_inp.weight",
    "ffn_gate_tid2eid.weight",
    "altup",
    "laurel",
    "per_layer_model_proj",
    "ssm_conv1d",
    "shortconv.conv.weight",
    "indexer.k_proj.weight",
    "indexer.q_proj.weight",
    *(
        f"time_mix_{part}.weight"
        for part in (
            "first", "w0", "w1", "w2", "v0", "v1", "v2", "a0", "a1", "a2", "g1", "g2",
            "decay_w1", "decay_w2", "lerp_fused",
        )
    ),
    "attn_rel_b.weight",
    ".position_embd",
    "sam.pos_embd",
    "sam.neck.",
    "sam.net_",
    ".rel_pos",
    ".patch_embd",
    ".patch_merger",
    "a.rvq.codebook",
    "mm.a.code_embd",
)  # fmt: skip

# Whole names: the text model's learned position embeddings and BERT's token types.
_NEVER_QUANTIZED_NAMES = frozenset({"position_embd.weight", "token_types.weight"})

# Parts kept for one architecture only (by its GGUF name).
_NEVER_QUANTIZED_BY_ARCHITECTURE: dict[str, tuple[str, ...]] = {
    "glm5-next": (
        "hc_",
        "indexer.attn_q_b",
        "indexer.attn_k",
        "indexer.proj",
        "indexer_compressor_gate",
        "indexer_compressor_ape",
        "ssm_f_a.weight",
        "ssm_f_b.weight",
        "ssm_g_a.weight",
        "ssm_g_b.weight",
        "ssm_beta.weight",
        "attn_kv_a_mqa.weight",
        "attn_k_b.weight",
        "attn_v_b.weight",
    ),
}


def ggml_dimensions(shape: Sequence[int]) -> int:
    """Dimensions of a tensor as ggml counts them: trailing dimensions of size 1 do not count.

    ``shape`` is in GGUF's order, innermost first (``[columns, rows, experts]``).

    Example:
        >>> ggml_dimensions([64, 1]), ggml_dimensions([64, 8]), ggml_dimensions([64, 8, 4])
        (1, 2, 3)
    """
    dims = len(shape)
    while dims > 1 and int(shape[dims - 1]) == 1:
        dims -= 1
    return dims


def allows_quantization(name: str, shape: Sequence[int], architecture: str = "") -> bool:
    """Whether ``llama-quantize`` would quantize the tensor ``name`` of this ``shape``.

    Matrices and experts' 3-D tensors named ``*weight`` are quantized; everything the rules
    above name stays at its source type.

    Example:
        >>> allows_quantization("blk.0.ffn_down_exps.weight", [64, 128, 8])
        True
        >>> allows_quantization("blk.0.ffn_gate_inp.weight", [64, 8])
        False
    """
    if ggml_dimensions(shape) < 2 or not name.endswith("weight"):
        return False
    if name in _NEVER_QUANTIZED_NAMES:
        return False
    parts = _NEVER_QUANTIZED_PARTS + _NEVER_QUANTIZED_BY_ARCHITECTURE.get(architecture, ())
    return not any(part in name for part in parts)
