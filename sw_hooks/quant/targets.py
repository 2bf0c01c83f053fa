"""Which weights a model quantization changes, and where its held-out elements sit in them.

A target is one stored weight: the ``weight`` of a Linear-like module, or a fused
mixture-of-experts parameter (``...mlp.experts.down_proj`` of shape ``[experts, out, in]``,
as transformers 5 stores experts). A fused parameter is quantized one expert at a time,
each expert's ``[out, in]`` matrix on its own, so no block ever mixes two experts. Experts
kept as a list of modules (``...mlp.experts.3.down_proj``) are Linear-like modules already.

Held-out super weights arrive as coordinates (:class:`~sw_hooks.core.access.Coordinate`)
and leave as index tuples into the target's ``[out, in]`` (or ``[experts, out, in]``)
shape, so the same code masks a dense weight and a stack of experts.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from sw_hooks.core.access import (
    CoordinateLike,
    WeightElement,
    coordinates_of,
    oriented_shape,
    oriented_weight,
)
from sw_hooks.core.locate import is_linear_like

__all__ = [
    "ModuleFilter",
    "ModuleSelection",
    "WeightTarget",
    "held_elements",
    "resolve_holdout",
    "select_modules",
    "select_weights",
]

ModuleFilter = Callable[[str, nn.Module], bool]
ModuleSelection = str | Sequence[str] | ModuleFilter | None
"""A glob over names, a list of exact names, ``filter(name, module) -> bool``, or ``None``."""


@dataclass(frozen=True)
class WeightTarget:
    """One weight to quantize: ``owner.weight``, or the fused parameter ``owner.<parameter_name>``.

    ``name`` is the module's name for a Linear-like module and the parameter's dotted path
    for a fused expert parameter: the name a :class:`~sw_hooks.core.access.Coordinate` uses.
    """

    name: str
    owner: nn.Module
    parameter_name: str = "weight"

    @classmethod
    def of_element(cls, element: WeightElement) -> WeightTarget:
        """The weight holding one resolved element."""
        return cls(element.module_name, element.module, element.parameter_name)

    @property
    def parameter(self) -> torch.Tensor:
        """The stored tensor (restoring writes here)."""
        return getattr(self.owner, self.parameter_name)

    @property
    def is_fused(self) -> bool:
        """True for an ``[experts, out, in]`` parameter."""
        return self.parameter_name != "weight"

    @property
    def shape(self) -> tuple[int, ...]:
        """``(out, in)``, or ``(experts, out, in)`` for a fused parameter, whatever the storage order."""
        if not self.is_fused:
            return oriented_shape(self.owner)
        experts, rows, cols = self.parameter.shape
        return (experts, cols, rows) if self._transposed_experts else (experts, rows, cols)

    def oriented(self) -> torch.Tensor:
        """The stored tensor as an ``[out, in]`` (or ``[experts, out, in]``) view, no copy.

        The view shares storage with the parameter, so writing it writes the weight.
        """
        if not self.is_fused:
            return oriented_weight(self.owner)
        stack = self.parameter.detach()
        return stack.transpose(1, 2) if self._transposed_experts else stack

    @property
    def _transposed_experts(self) -> bool:
        return getattr(self.owner, "is_transposed", False) is True


def _linear_targets(model: nn.Module) -> dict[str, WeightTarget]:
    return {
        name: WeightTarget(name, module)
        for name, module in model.named_modules()
        if name and is_linear_like(module) and not isinstance(module, nn.Embedding)
    }


def _fused_expert_targets(model: nn.Module) -> dict[str, WeightTarget]:
    """Every 3-D floating parameter of every experts module that holds a 3-D ``down_proj``."""
    targets = {}
    for name, module in model.named_modules():
        down = getattr(module, "down_proj", None)
        if not isinstance(down, nn.Parameter) or down.dim() != 3:
            continue
        for parameter_name, parameter in module.named_parameters(recurse=False):
            if parameter.dim() == 3 and parameter.is_floating_point():
                path = f"{name}.{parameter_name}" if name else parameter_name
                targets[path] = WeightTarget(path, module, parameter_name)
    return targets


def _excluded_weights(model: nn.Module) -> set[int]:
    """Ids of the embedding and LM-head weights (tied or not), which are not quantized by default."""
    excluded = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        if module is not None and isinstance(getattr(module, "weight", None), torch.Tensor):
            excluded.add(id(module.weight))
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            excluded.add(id(module.weight))
    return excluded


def _choose(
    model: nn.Module, candidates: dict[str, WeightTarget], modules: ModuleSelection, kinds: str
) -> dict[str, WeightTarget]:
    """The candidates ``modules`` selects, every one materialized; ``kinds`` names them in errors."""
    if modules is None:
        excluded = _excluded_weights(model)
        chosen = {n: t for n, t in candidates.items() if id(t.parameter) not in excluded}
    elif isinstance(modules, str):
        chosen = {n: t for n, t in candidates.items() if fnmatch.fnmatchcase(n, modules)}
    elif callable(modules):
        chosen = {n: t for n, t in candidates.items() if modules(n, t.owner)}
    else:
        missing = [n for n in modules if n not in candidates]
        if missing:
            raise ValueError(f"not {kinds} of this model: {missing[:5]}")
        chosen = {n: candidates[n] for n in modules}
    if not chosen:
        raise ValueError(f"no {kinds} selected by modules={modules!r}")
    for name, target in chosen.items():
        if target.parameter.device.type == "meta" or type(target.parameter).__name__ == "DTensor":
            raise ValueError(f"{name} is offloaded or sharded; quantize a materialized model")
    return chosen


def select_modules(model: nn.Module, modules: ModuleSelection = None) -> dict[str, nn.Module]:
    """The Linear-like modules chosen by ``modules``, by name (what activation hooks wrap).

    Args:
        model: the model.
        modules: ``None`` for every Linear-like module but the embeddings and the LM head;
            a glob (``"*.mlp.*"``); a list of exact names; or ``filter(name, module) -> bool``
            (torchao's ``filter_fn``).

    Raises:
        ValueError: a listed name is missing or not Linear-like, nothing was selected, or a
            chosen weight is offloaded or sharded.

    Example:
        >>> from sw_hooks.testing import tiny_model
        >>> len(select_modules(tiny_model("llama", num_layers=2)))
        14
    """
    chosen = _choose(model, _linear_targets(model), modules, "Linear-like modules")
    return {name: target.owner for name, target in chosen.items()}


def select_weights(model: nn.Module, modules: ModuleSelection = None) -> dict[str, WeightTarget]:
    """The weights :func:`~sw_hooks.quant.quantize.quantize_model` changes, by name.

    As :func:`select_modules`, plus every fused expert parameter (``gate_up_proj`` and
    ``down_proj`` of each experts module), named by its dotted path; a filter gets the
    experts module that holds it.

    Example:
        >>> from sw_hooks.testing import tiny_moe_model
        >>> list(select_weights(tiny_moe_model("mixtral", num_layers=1), "*.experts.*"))
        ['model.layers.0.mlp.experts.gate_up_proj', 'model.layers.0.mlp.experts.down_proj']
    """
    candidates = _linear_targets(model) | _fused_expert_targets(model)
    kinds = "Linear-like modules or fused expert parameters"
    return _choose(model, candidates, modules, kinds)


def held_elements(
    model: nn.Module, holdout: Iterable[CoordinateLike] | CoordinateLike | None
) -> list[WeightElement]:
    """Every held-out coordinate looked up in ``model`` (a ``DetectionResult`` gives its super weights).

    Raises:
        ValueError: a module or expert is missing, or a coordinate lies outside its weight.
    """
    if holdout is None:
        return []
    if hasattr(holdout, "select"):  # a DetectionResult: its one selection rule
        holdout = holdout.select()
    return [WeightElement.resolve(model, coordinate) for coordinate in coordinates_of(holdout)]


def resolve_holdout(
    model: nn.Module, holdout: Iterable[CoordinateLike] | CoordinateLike | None
) -> dict[str, list[tuple[int, ...]]]:
    """``{weight name: [index, ...]}``: ``(row, col)``, or ``(expert, row, col)`` in a fused parameter.

    Indices follow :attr:`WeightTarget.shape` (``[out, in]`` order); every coordinate is
    checked. A per-expert module (``...experts.3.down_proj``) is a dense weight of its own.

    Raises:
        ValueError: a module or expert is missing, or a coordinate lies outside its weight.

    Example:
        >>> from sw_hooks.testing import tiny_model
        >>> resolve_holdout(tiny_model("llama", num_layers=1), [("model.layers.0.mlp.down_proj", 3, 5)])
        {'model.layers.0.mlp.down_proj': [(3, 5)]}
    """
    grouped: dict[str, list[tuple[int, ...]]] = {}
    for element in held_elements(model, holdout):
        index = (element.row, element.col)
        if element.is_fused_expert:
            index = (element.expert, *index)
        grouped.setdefault(element.module_name, []).append(index)
    return grouped
