"""Where each architecture keeps its MLP down-projection, and which way its weight faces.

A super weight lives at ``down_proj.weight[row, col]`` in PyTorch's ``[out, in]`` order.
GPT-2's ``Conv1D`` stores its weight as ``[in, out]``; :func:`is_transposed` tells which
is which so that every coordinate this library reports is ``[output channel, input channel]``.
"""

from __future__ import annotations

import fnmatch
import re
import warnings
from collections.abc import Iterator

import torch
from torch import nn

# Module-name patterns of the dense MLP down-projection, by architecture family.
KNOWN_DOWN_PROJECTIONS: dict[str, str] = {
    # Llama, Mistral, Qwen2/Qwen3, Gemma/Gemma2/Gemma3, Phi-3, OLMo/OLMo2, SmolLM
    "mlp.down_proj": r"(?:^|\.)\d+\.mlp\.down_proj$",
    # GPT-2 (Conv1D, weight stored [in, out])
    "mlp.c_proj": r"(?:^|\.)\d+\.mlp\.c_proj$",
    # GPT-NeoX / Pythia, Falcon
    "mlp.dense_4h_to_h": r"(?:^|\.)\d+\.mlp\.dense_4h_to_h$",
    # OPT
    "fc2": r"(?:^|\.)layers\.\d+\.fc2$",
}

_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def is_linear_like(module: nn.Module) -> bool:
    """True for ``nn.Linear``, transformers' ``Conv1D`` and any module with a 2-D ``weight``."""
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() == 2


def is_transposed(module: nn.Module) -> bool:
    """True when the module stores its weight as ``[in, out]`` (GPT-2's ``Conv1D``)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def layer_index(name: str) -> int | None:
    """The first integer component of a dotted module name: ``model.layers.3.mlp`` -> 3."""
    match = _LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


def _matches(name: str, pattern: str | re.Pattern[str]) -> bool:
    if isinstance(pattern, re.Pattern):
        return pattern.search(name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def _sort_key(item: tuple[str, nn.Module]) -> tuple[int, int, str]:
    index = layer_index(item[0])
    return (index is None, index if index is not None else 0, item[0])


def _linear_like_names(model: nn.Module) -> Iterator[str]:
    return (name for name, module in model.named_modules() if name and is_linear_like(module))


def _describe_linear_modules(model: nn.Module, limit: int = 12) -> str:
    # Collapse layer numbers so a 32-layer model lists each kind of projection once.
    shapes = sorted(
        {
            _LAYER_INDEX.sub(lambda m: m.group(0).replace(m.group(1), "*"), n)
            for n in _linear_like_names(model)
        }
    )
    if not shapes:
        return "no Linear-like modules at all"
    shown = ", ".join(shapes[:limit])
    more = f" and {len(shapes) - limit} more" if len(shapes) > limit else ""
    return f"Linear-like modules seen: {shown}{more}"


def find_down_projections(
    model: nn.Module, pattern: str | re.Pattern[str] | None = None
) -> dict[str, nn.Module]:
    """Find the MLP down-projections of ``model``, ordered by layer index.

    Args:
        model: any ``nn.Module``; a Hugging Face model or a hand-written one.
        pattern: where the down-projections are, for architectures this module does not
            know: a glob over module names (``"blocks.*.ffn.out"``) or a compiled regular
            expression (``re.compile(r"blocks\\.\\d+\\.ffn\\.out$")``).

    Returns:
        ``{module_name: module}``, ordered by the layer index parsed from each name.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: nothing matched; the message lists the Linear-like modules seen.

    Example:
        >>> from sw_hooks.testing import tiny_model
        >>> list(find_down_projections(tiny_model("llama", num_layers=2)))
        ['model.layers.0.mlp.down_proj', 'model.layers.1.mlp.down_proj']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if pattern is not None and not isinstance(pattern, str | re.Pattern):
        raise TypeError(
            f"pattern must be a glob string or a compiled regex, got {type(pattern).__name__}"
        )
    if pattern is None:
        known = [re.compile(p) for p in KNOWN_DOWN_PROJECTIONS.values()]
        found = [
            (n, m)
            for n, m in model.named_modules()
            if is_linear_like(m) and any(p.search(n) for p in known)
        ]
    else:
        found = [
            (n, m)
            for n, m in model.named_modules()
            if n and is_linear_like(m) and _matches(n, pattern)
        ]
    experts = expert_module_names(model) if pattern is None else []
    if not found:
        where = f"matching {pattern!r}" if pattern is not None else "of a known architecture"
        hint = " For mixture-of-experts layers use sw_hooks.core.moe." if experts else ""
        raise ValueError(
            f"no MLP down-projection {where} in {type(model).__name__}; "
            f"{_describe_linear_modules(model)}. Pass pattern= to name them.{hint}"
        )
    if experts:
        warnings.warn(
            f"skipping the experts of {', '.join(experts)}: dense recording does not see them; "
            "use sw_hooks.moe (record_experts, detect_expert_weights) for those layers",
            UserWarning,
            stacklevel=2,
        )
    return dict(sorted(found, key=_sort_key))


def expert_module_names(model: nn.Module) -> list[str]:
    """Mixture-of-experts modules: a 3-D ``down_proj`` parameter, or a ``ModuleList`` ``*experts``.

    Example:
        >>> from sw_hooks.testing import tiny_model
        >>> expert_module_names(tiny_model("llama", num_layers=1))
        []
    """
    return [
        name
        for name, module in model.named_modules()
        if (isinstance(module, nn.ModuleList) and name.endswith("experts"))
        or (
            isinstance(getattr(module, "down_proj", None), nn.Parameter)
            and module.down_proj.dim() == 3
        )
    ]
