"""Where each architecture keeps its MLP down-projection, and which way its weight faces.

Known architectures are found by module name (:data:`KNOWN_DOWN_PROJECTIONS`); any other
``nn.Module`` by the structure of its data flow (:mod:`sw_hooks.core.structure`), from one
traced forward. A super weight lives at ``down_proj.weight[row, col]`` in PyTorch's ``[out, in]`` order.
GPT-2's ``Conv1D`` stores its weight as ``[in, out]``; :func:`is_transposed` tells which
is which so that every coordinate this library reports is ``[output channel, input channel]``.
"""

from __future__ import annotations

import fnmatch
import re
import warnings
from collections.abc import Iterator
from typing import NoReturn

from torch import nn

from sw_hooks.core.structure import (
    ExampleInput,
    ExampleInputNeeded,
    check_example_input,
    find_output_projections,
    is_linear_like,
)

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
    # the always-on shared expert beside routed experts: Qwen2-MoE, DeepSeek-V2/V3
    "mlp.shared_expert(s).down_proj": r"(?:^|\.)\d+\.mlp\.shared_experts?\.down_proj$",
}

_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


__all__ = [
    "KNOWN_DOWN_PROJECTIONS",
    "DownProjections",
    "find_down_projections",
    "is_linear_like",
    "is_transposed",
    "layer_index",
]


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


class DownProjections(dict[str, nn.Module]):
    """``{module_name: module}`` ordered by layer, and how each module was found.

    ``found_by[name]`` is ``"name"`` (a known architecture's module name), ``"pattern"``
    (the caller's ``pattern=``) or ``"structure"`` (its place in the data flow).
    """

    def __init__(self, found: list[tuple[str, nn.Module]], found_by: str) -> None:
        super().__init__(sorted(found, key=_sort_key))
        self.found_by: dict[str, str] = dict.fromkeys(self, found_by)


def find_down_projections(
    model: nn.Module,
    pattern: str | re.Pattern[str] | None = None,
    *,
    example_input: ExampleInput | None = None,
    check_structure: bool = False,
) -> DownProjections:
    """Find the MLP down-projections of ``model``, ordered by layer index.

    Without ``pattern``, module names of known architectures are tried first; when none
    matches, the down-projections are found by structure
    (:func:`~sw_hooks.core.structure.find_output_projections`: one traced forward).

    Args:
        model: any ``nn.Module``; a Hugging Face model or a hand-written one.
        pattern: where the down-projections are: a glob over module names
            (``"blocks.*.ffn.out"``) or a compiled regular expression
            (``re.compile(r"blocks\\.\\d+\\.ffn\\.out$")``).
        example_input: what the model is called with for the structural trace (a tensor,
            a tuple of arguments or a dict of keyword arguments); by default one is built
            from the model's Hugging Face config.
        check_structure: when the names match, also locate by structure and warn if the two
            disagree.

    Returns:
        :class:`DownProjections`: ``{module_name: module}`` ordered by the layer index
        parsed from each name, with ``found_by`` saying how each module was found.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or ``pattern`` / ``example_input`` is
            of the wrong type.
        ValueError: nothing matched or was found by structure; the message lists the
            Linear-like modules seen. It is an
            :class:`~sw_hooks.core.structure.ExampleInputNeeded` when only an example
            input was missing for the structural trace.

    Example:
        >>> from sw_hooks.testing import tiny_model
        >>> found = find_down_projections(tiny_model("llama", num_layers=2))
        >>> list(found), found.found_by["model.layers.0.mlp.down_proj"]
        (['model.layers.0.mlp.down_proj', 'model.layers.1.mlp.down_proj'], 'name')
    """
    _check_arguments(model, pattern, example_input)
    if pattern is not None:
        found = [(n, m) for n, m in model.named_modules() if n and is_linear_like(m)]
        by_pattern = [(n, m) for n, m in found if _matches(n, pattern)]
        if not by_pattern:
            _raise_nothing_found(model, f"matching {pattern!r}", "")
        return DownProjections(by_pattern, "pattern")
    experts = _experts_modules(model)
    by_name = _by_known_name(model)
    if by_name and check_structure:
        _warn_if_structure_disagrees(model, by_name, example_input)
    return by_name or _by_structure(model, example_input, experts)


def _experts_modules(model: nn.Module) -> list[str]:
    """Names of the model's experts modules: a routed expert's MLP is not a dense unit."""
    from sw_hooks.core.experts import find_experts  # experts.py reads layer indices from here

    return list(find_experts(model, warn=False, required=False))


def _outside(experts: list[str], name: str) -> bool:
    return not any(name == e or name.startswith(e + ".") for e in experts)


def _check_arguments(model: object, pattern: object, example_input: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if pattern is not None and not isinstance(pattern, str | re.Pattern):
        raise TypeError(
            f"pattern must be a glob string or a compiled regex, got {type(pattern).__name__}"
        )
    check_example_input(example_input)


def _by_known_name(model: nn.Module) -> DownProjections:
    known = [re.compile(p) for p in KNOWN_DOWN_PROJECTIONS.values()]
    found = [
        (n, m)
        for n, m in model.named_modules()
        if is_linear_like(m) and any(p.search(n) for p in known)
    ]
    return DownProjections(found, "name")


def _by_structure(
    model: nn.Module, example_input: ExampleInput | None, experts: list[str]
) -> DownProjections:
    hint = (
        f" Its experts ({', '.join(experts)}) are recorded per expert: record(model)."
        if experts
        else ""
    )
    if _linear_count(model) < 2:  # no trace can find an MLP in it: say so now, not on a call
        _raise_nothing_found(
            model, "of a known architecture", f" None by structure: fewer than two linears.{hint}"
        )
    try:
        names = [n for n in find_output_projections(model, example_input) if _outside(experts, n)]
    except ValueError as error:
        reason = str(error).splitlines()[0].rstrip(".")
        tail = f" None by structure: {reason}.{hint}"
        # Told apart so that record() can trace the model's first call instead.
        needed = isinstance(error, ExampleInputNeeded)
        _raise_nothing_found(model, "of a known architecture", tail, needed)
    if not names:
        _raise_nothing_found(model, "of a known architecture", f" None by structure either.{hint}")
    return DownProjections([(n, model.get_submodule(n)) for n in names], "structure")


def _linear_count(model: nn.Module) -> int:
    return sum(1 for m in model.modules() if is_linear_like(m) and not isinstance(m, nn.Embedding))


def _raise_nothing_found(
    model: nn.Module, where: str, tail: str, input_needed: bool = False
) -> NoReturn:
    error = ExampleInputNeeded if input_needed else ValueError
    raise error(
        f"no MLP down-projection {where} in {type(model).__name__}; "
        f"{_describe_linear_modules(model)}. Pass pattern= to name them.{tail}"
    )


def _warn_if_structure_disagrees(
    model: nn.Module, by_name: DownProjections, example_input: ExampleInput | None
) -> None:
    by_structure = set(find_output_projections(model, example_input))
    only_name, only_structure = set(by_name) - by_structure, by_structure - set(by_name)
    if only_name or only_structure:
        warnings.warn(
            f"the down-projections found by name and by structure differ in "
            f"{type(model).__name__}: only by name {sorted(only_name)}, only by structure "
            f"{sorted(only_structure)}",
            UserWarning,
            stacklevel=3,
        )
