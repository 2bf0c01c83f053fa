"""GGUF tensor names of transformers modules: the one map, by gguf's own name tables.

Both the GGUF export (:mod:`sw_hooks.export.gguf`) and the quantizer configs and importance
matrices (:mod:`sw_hooks.export.quantizers`, :mod:`sw_hooks.export.imatrix`) name tensors
through :func:`gguf_tensor_name`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

GGUF_ARCHITECTURES: Mapping[str, str] = {
    "mistral": "llama",
    "mixtral": "llama",
    "gpt_neox": "gptneox",
    "gemma3_text": "gemma3",
    "qwen2_moe": "qwen2moe",
    "qwen3_moe": "qwen3moe",
}
"""transformers ``model_type`` -> gguf architecture name, where the two differ."""

_INDEX = re.compile(r"\.(\d+)(?:\.|$)")
_EXPERT_IN_PATH = re.compile(r"\.experts\.\d+\.")


def gguf_tensor_name(module: str, architecture: str, expert: int | None = None) -> str:
    """The GGUF weight tensor of a transformers module, e.g. ``blk.11.ffn_down.weight``.

    ``architecture`` is the transformers ``model_type`` (``llama``, ``qwen2``...) or a gguf
    architecture name (a GGUF file's ``general.architecture``). An expert's own
    down-projection (``...experts.3.down_proj``, with ``expert=3``) is held by the layer's
    3-D experts tensor, as llama.cpp merges the experts (``ffn_down_exps``).

    Raises:
        ValueError: when gguf does not know the architecture or maps no tensor to ``module``.

    Example:
        >>> gguf_tensor_name("model.layers.11.mlp.down_proj", "llama")
        'blk.11.ffn_down.weight'
        >>> gguf_tensor_name("model.layers.1.mlp.experts.3.down_proj", "qwen2moe", expert=3)
        'blk.1.ffn_down_exps.weight'
    """
    import gguf

    arch = _gguf_architecture(architecture)
    # gguf's map names blocks 0 .. count - 1: the module's own indices set the count.
    blocks = max([1, *(int(n) + 1 for n in _INDEX.findall(module))])
    if expert is not None:
        module = _EXPERT_IN_PATH.sub(".experts.", module)
    mapped = gguf.get_tensor_name_map(arch, blocks).get_name(module)
    if mapped is None:
        raise ValueError(f"gguf has no {architecture} tensor for module {module!r}")
    return f"{mapped}.weight"


def _gguf_architecture(architecture: str) -> Any:
    import gguf

    name = GGUF_ARCHITECTURES.get(architecture, architecture)
    for arch, arch_name in gguf.MODEL_ARCH_NAMES.items():
        if arch_name == name:
            return arch
    raise ValueError(f"gguf does not map the architecture {architecture!r} to GGUF tensor names")
