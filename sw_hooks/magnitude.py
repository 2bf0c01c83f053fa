"""Weight-magnitude discovery, streamed one tensor at a time with ``topk``.

Never concatenates a model's weights: memory stays at one weight matrix plus the top-k.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from sw_hooks.access import Coordinate, as_triple, oriented_weight
from sw_hooks.locate import is_linear_like, layer_index

# Module-name endings of each weight type, across the architectures the locator knows.
WEIGHT_TYPES: dict[str, tuple[str, ...]] = {
    "down_proj": ("mlp.down_proj", "mlp.c_proj", "mlp.dense_4h_to_h", "fc2"),
    "up_proj": ("mlp.up_proj", "mlp.c_fc", "mlp.dense_h_to_4h", "fc1"),
    "gate_proj": ("mlp.gate_proj",),
    "o_proj": ("self_attn.o_proj", "attn.c_proj", "attention.dense", "self_attn.out_proj"),
    "q_proj": ("self_attn.q_proj",),
    "k_proj": ("self_attn.k_proj",),
    "v_proj": ("self_attn.v_proj",),
}


def decoder_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every Linear-like module inside a numbered layer: no embeddings, no LM head."""
    return {
        name: m
        for name, m in model.named_modules()
        if name and is_linear_like(m) and layer_index(name) is not None
    }


def modules_of_type(
    model: nn.Module, weight_type: str, layers: Iterable[int] | None = None
) -> dict[str, nn.Module]:
    """Linear-like modules of one weight type (``"down_proj"``, ``"all"``, ...), optionally by layer."""
    if weight_type != "all" and weight_type not in WEIGHT_TYPES:
        raise ValueError(
            f"unknown weight_type {weight_type!r}; choose 'all' or one of {sorted(WEIGHT_TYPES)}"
        )
    wanted = None if layers is None else set(layers)
    found = {}
    for name, module in decoder_linears(model).items():
        if weight_type != "all" and not name.endswith(WEIGHT_TYPES[weight_type]):
            continue
        if wanted is not None and layer_index(name) not in wanted:
            continue
        found[name] = module
    return found


def _excluded_by_module(exclude: Iterable[Coordinate]) -> dict[str, list[tuple[int, int]]]:
    by_module: dict[str, list[tuple[int, int]]] = {}
    for coordinate in exclude:
        name, row, col = as_triple(coordinate)
        by_module.setdefault(name, []).append((row, col))
    return by_module


@torch.no_grad()
def _abs_weight(module: nn.Module, excluded: Sequence[tuple[int, int]]) -> torch.Tensor:
    magnitude = oriented_weight(module).detach().abs().float()
    if excluded:
        rows, cols = zip(*excluded, strict=True)
        magnitude[list(rows), list(cols)] = -1.0
    return magnitude


def largest_weights(
    model: nn.Module,
    count_per_matrix: int,
    *,
    modules: dict[str, nn.Module] | None = None,
    exclude: Iterable[Coordinate] = (),
) -> list[tuple[str, int, int]]:
    """The ``count_per_matrix`` largest ``|w|`` of every decoder linear weight, as coordinates.

    ``exclude`` (e.g. the super weights) never appears in the result.
    """
    if count_per_matrix < 1:
        raise ValueError(f"count_per_matrix must be at least 1, got {count_per_matrix}")
    excluded = _excluded_by_module(exclude)
    found = []
    for name, module in (modules or decoder_linears(model)).items():
        magnitude = _abs_weight(module, excluded.get(name, ()))
        top = magnitude.flatten().topk(min(count_per_matrix, magnitude.numel())).indices
        in_features = magnitude.shape[1]
        found += [(name, int(i) // in_features, int(i) % in_features) for i in top]
    return found


def find_by_magnitude(
    model: nn.Module,
    threshold: float,
    *,
    weight_type: str = "down_proj",
    criterion: str = "percentage",
    layers: Iterable[int] | None = None,
) -> list[tuple[str, int, int, float]]:
    """Weights that stand out by magnitude alone: ``(module, row, col, value)``.

    Args:
        threshold: with ``criterion="percentage"``, the top ``threshold`` percent of each
            matrix's ``|w|`` (``0.0001`` is the top one-millionth); with ``"absolute"``,
            every weight with ``|w| >= threshold``.
        weight_type: ``"down_proj"`` (default), another type of :data:`WEIGHT_TYPES`, or ``"all"``.
        layers: restrict to these layer indices.

    A large weight is not necessarily a super weight: verify with :func:`sw_hooks.detect.verify`.
    """
    if criterion not in ("percentage", "absolute"):
        raise ValueError(f"criterion must be 'percentage' or 'absolute', got {criterion!r}")
    if not isinstance(threshold, int | float) or not threshold > 0:
        raise ValueError(f"threshold must be a positive number, got {threshold!r}")
    if criterion == "percentage" and threshold > 100:
        raise ValueError(f"a percentage threshold must be at most 100, got {threshold}")
    found = []
    for name, module in modules_of_type(model, weight_type, layers).items():
        weight = oriented_weight(module).detach()
        magnitude = weight.abs().float().flatten()
        if criterion == "percentage":
            k = max(1, int(magnitude.numel() * threshold / 100))
            indices = magnitude.topk(k).indices
        else:
            indices = torch.nonzero(magnitude >= threshold).flatten()
        in_features = weight.shape[1]
        found += [
            (name, int(i) // in_features, int(i) % in_features, float(weight.flatten()[i]))
            for i in indices
        ]
    return found
