"""Weight-magnitude discovery, streamed one tensor at a time with ``topk``.

Never concatenates a model's weights: memory stays at one weight matrix plus the top-k.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from sw_hooks.core.access import Coordinate, as_triple, oriented_weight
from sw_hooks.core.locate import is_linear_like, layer_index

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
def top_magnitudes(
    weight: torch.Tensor, k: int, excluded: Sequence[tuple[int, int]] = ()
) -> list[tuple[int, int]]:
    """``(row, col)`` of the ``k`` largest ``|w|`` of a 2-D weight, skipping ``excluded``.

    Never sorts the matrix: the k largest elements lie in the ``k + len(excluded)`` rows
    with the largest row maxima (each row ranked above an element's own row holds a
    larger element), so one pass of row maxima narrows ``topk`` to a few rows.

    Example:
        >>> top_magnitudes(torch.tensor([[1.0, -9.0], [3.0, 4.0]]), 2)
        [(0, 1), (1, 1)]
    """
    weight = weight.detach()
    row_peak = torch.maximum(weight.amax(1), -weight.amin(1)).float()
    rows = row_peak.topk(min(weight.shape[0], k + len(excluded))).indices
    block = weight[rows].abs().float()
    position = {int(r): i for i, r in enumerate(rows)}
    for row, col in excluded:
        if row in position:
            block[position[row], col] = -1.0
    top = block.flatten().topk(min(k, block.numel())).indices
    columns = weight.shape[1]
    return [(int(rows[int(i) // columns]), int(i) % columns) for i in top]


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
        top = top_magnitudes(oriented_weight(module), count_per_matrix, excluded.get(name, ()))
        found += [(name, row, col) for row, col in top]
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

    A large weight is not necessarily a super weight: verify with :func:`sw_hooks.analysis.detect.verify`.
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
        if criterion == "percentage":
            k = max(1, int(weight.numel() * threshold / 100))
            coordinates = top_magnitudes(weight, k)
        else:
            coordinates = [tuple(c) for c in torch.nonzero(weight.abs() >= threshold).tolist()]
        found += [(name, row, col, float(weight[row, col])) for row, col in coordinates]
    return found
