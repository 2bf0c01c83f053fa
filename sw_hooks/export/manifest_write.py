"""Write a super-weight manifest: each super weight's exact bits, read from the model itself."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from sw_hooks.core.access import Coordinate, CoordinateLike, WeightElement, coordinates_of
from sw_hooks.core.results import DetectionResult, SuperWeight
from sw_hooks.export.manifest_format import DTYPES, Manifest, ManifestWeight, to_bits
from sw_hooks.export.manifest_identity import model_identity, source_identity


def write_manifest(
    result_or_weights: DetectionResult | Sequence[CoordinateLike],
    model: nn.Module,
    path: str | Path,
    *,
    source: str | Path | None = None,
) -> Manifest:
    """Write the manifest of ``model``'s super weights to ``path`` and return it.

    Values and bits are read from ``model`` itself, so write it before anything rounds them.
    A :class:`DetectionResult` contributes its verified weights and its options; pass
    ``result.candidates`` to keep the unverified candidates too. ``source`` is a local
    weights file (its sha256 is recorded) or a revision string.
    """
    weights, detection = _weights_and_options(result_or_weights)
    entries = tuple(_manifest_weight(model, weight) for weight in weights)
    manifest = Manifest(model_identity(model, entries, source_identity(source)), entries, detection)
    Path(path).write_text(json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n")
    return manifest


def _weights_and_options(
    result_or_weights: DetectionResult | Sequence[CoordinateLike],
) -> tuple[Sequence[CoordinateLike], dict[str, Any] | None]:
    if isinstance(result_or_weights, DetectionResult):
        return result_or_weights.verified, dict(result_or_weights.options)
    if isinstance(result_or_weights, str | bytes) or not isinstance(result_or_weights, Sequence):
        raise TypeError(
            "expected a DetectionResult or a sequence of super weights or coordinates, "
            f"got {type(result_or_weights).__name__}"
        )
    coordinates_of(list(result_or_weights))  # every coordinate checked before any reading
    return result_or_weights, None


def _manifest_weight(model: nn.Module, weight: CoordinateLike) -> ManifestWeight:
    coordinate = Coordinate.of(weight)
    module, row, col = coordinate.module, coordinate.row, coordinate.col
    element = WeightElement.resolve(model, coordinate)
    value = element.read()
    if value is None:
        raise ValueError(f"{module}[{row}, {col}] is not on this rank; write from a full copy")
    dtype = str(value.dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise ValueError(f"{module} stores {dtype}; a manifest holds one of {sorted(DTYPES)}")
    number = float(value)
    token = weight.token_position if isinstance(weight, SuperWeight) else None
    return ManifestWeight(
        module=module,
        row=row,
        col=col,
        expert=coordinate.expert,
        value=number if math.isfinite(number) else None,
        dtype=dtype,
        bits=to_bits(value),
        activation_channel=row,
        token_position=token,
    )
