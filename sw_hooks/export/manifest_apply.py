"""Apply a super-weight manifest: write its exact values back into a model, all or nothing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sw_hooks.core.access import WeightElement
from sw_hooks.export.manifest_format import Manifest, ManifestWeight, read_manifest, to_bits
from sw_hooks.export.manifest_identity import check_model


@dataclass(frozen=True)
class AppliedWeight:
    """What :func:`apply_manifest` did to one element (``old`` is None off-shard)."""

    module: str
    row: int
    col: int
    expert: int | None
    old: float | None
    new: float
    changed: bool


@dataclass(frozen=True)
class ApplyReport:
    """Every element :func:`apply_manifest` wrote, in manifest order."""

    weights: tuple[AppliedWeight, ...]

    @property
    def changed(self) -> tuple[AppliedWeight, ...]:
        """The elements whose bits differ from what the model held before."""
        return tuple(weight for weight in self.weights if weight.changed)


def apply_manifest(model: nn.Module, manifest: Manifest | str | Path) -> ApplyReport:
    """Write the manifest's exact values into ``model`` (e.g. after quantizing it).

    Every check runs before the first write: the architecture, the config sizes and each
    module's shape must match, and each value must fit the model's dtype. Values are
    converted to the stored dtype (bit-exact when it is the manifest's). If a write fails,
    the elements already written get their old values back.
    """
    if not isinstance(manifest, Manifest):
        manifest = read_manifest(manifest)
    check_model(model, manifest)
    planned = [_planned_write(model, weight) for weight in manifest.super_weights]
    written: list[tuple[WeightElement, torch.Tensor | None]] = []
    try:
        for element, old, new in planned:
            element.write(new)
            written.append((element, old))
    except BaseException:
        for element, old in reversed(written):
            element.write(old)
        raise
    return ApplyReport(
        tuple(
            _applied(weight, old, new)
            for weight, (_, old, new) in zip(manifest.super_weights, planned, strict=True)
        )
    )


def _planned_write(
    model: nn.Module, weight: ManifestWeight
) -> tuple[WeightElement, torch.Tensor | None, torch.Tensor]:
    element = WeightElement.resolve(model, weight.coordinate)
    old = element.read()
    dtype = element.parameter.dtype if old is None else old.dtype
    if not dtype.is_floating_point:
        raise ValueError(f"{weight.module} stores {dtype}; apply the manifest to a float model")
    stored = weight.tensor()
    new = stored.to(dtype)
    if torch.isfinite(stored) and not torch.isfinite(new):
        raise ValueError(
            f"{weight.module}[{weight.row}, {weight.col}] = {float(stored)} overflows {dtype}"
        )
    return element, old, new


def _applied(weight: ManifestWeight, old: torch.Tensor | None, new: torch.Tensor) -> AppliedWeight:
    changed = old is not None and to_bits(old) != to_bits(new)
    return AppliedWeight(
        weight.module,
        weight.row,
        weight.col,
        weight.expert,
        None if old is None else float(old),
        float(new),
        changed,
    )
