"""A super-weight manifest: hand exact super-weight values to the tools that ship models.

A quantizer, a merge or a format conversion may round a super weight away. The manifest
records each one bit for bit, with enough of the model's identity to refuse the wrong
model, so :func:`apply_manifest` can write the exact values back afterwards.

Schema (``schema_version`` 1; JSON with sorted keys)::

    {
      "format": "sw_hooks.super_weight_manifest",
      "schema_version": 1,
      "model": {
        "architecture": "LlamaForCausalLM",          # the model's class name
        "model_type": "llama" | null,                 # config.model_type
        "num_hidden_layers": 4 | null,                # config.num_hidden_layers
        "hidden_size": 64 | null,                     # config.hidden_size
        "modules": {"model.layers.1.mlp.down_proj": [64, 128]},  # [out, in]; fused experts
                                                      # [experts, out, in]
        "source": null
                  | {"kind": "file", "name": "model.safetensors", "bytes": 123, "sha256": "..."}
                  | {"kind": "revision", "revision": "main"}
      },
      "super_weights": [
        {"module": "model.layers.1.mlp.down_proj", "row": 5, "col": 17, "expert": null,
         "value": 8.0 | null,                         # null when not finite
         "dtype": "bfloat16", "bits": "4100",         # the element's bits, as an unsigned hex integer
         "activation_channel": 5,                     # the row: where the super activation appears
         "token_position": 3 | null}
      ],
      "detection": {...DetectionOptions...} | null
    }

Example:
    >>> from sw_hooks.testing import planted_llama
    >>> planted = planted_llama()
    >>> write_manifest([("model.layers.1.mlp.down_proj", 5, 17)], planted.model, "sw.json")
    >>> report = apply_manifest(planted.model, read_manifest("sw.json"))
    >>> report.changed
    ()
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sw_hooks.core.access import (
    Coordinate,
    CoordinateLike,
    WeightElement,
    coordinates_of,
    oriented_shape,
)
from sw_hooks.core.results import DetectionResult, SuperWeight, read_json

FORMAT = "sw_hooks.super_weight_manifest"
SCHEMA_VERSION = 1

_DTYPES: dict[str, torch.dtype] = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
}
_WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".npz")


@dataclass(frozen=True)
class ManifestWeight:
    """One super weight as the manifest stores it: where, and its exact bits."""

    module: str
    row: int
    col: int
    expert: int | None
    value: float | None
    dtype: str
    bits: str
    activation_channel: int
    token_position: int | None

    def tensor(self) -> torch.Tensor:
        """The stored element as a 0-d tensor of its original dtype, bit for bit."""
        return _from_bits(self.bits, _DTYPES[self.dtype])

    @property
    def coordinate(self) -> Coordinate:
        return Coordinate(self.module, self.row, self.col, self.expert)


@dataclass(frozen=True)
class Manifest:
    """A validated manifest: the model's identity, the weights and the detection settings."""

    model: dict[str, Any]
    super_weights: tuple[ManifestWeight, ...]
    detection: dict[str, Any] | None = None
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "schema_version": self.schema_version,
            "model": self.model,
            "super_weights": [vars(weight).copy() for weight in self.super_weights],
            "detection": self.detection,
        }


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


# -- writing -------------------------------------------------------------------------------


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
    ``result.super_weights`` to keep the unverified candidates too. ``source`` is a local
    weights file (its sha256 is recorded) or a revision string.
    """
    weights, detection = _weights_and_options(result_or_weights)
    entries = tuple(_manifest_weight(model, weight) for weight in weights)
    manifest = Manifest(_identity(model, entries, _source(source)), entries, detection)
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
    if dtype not in _DTYPES:
        raise ValueError(f"{module} stores {dtype}; a manifest holds one of {sorted(_DTYPES)}")
    number = float(value)
    token = weight.token_position if isinstance(weight, SuperWeight) else None
    return ManifestWeight(
        module=module,
        row=row,
        col=col,
        expert=coordinate.expert,
        value=number if math.isfinite(number) else None,
        dtype=dtype,
        bits=_to_bits(value),
        activation_channel=row,
        token_position=token,
    )


def _identity(
    model: nn.Module, entries: Sequence[ManifestWeight], source: dict[str, Any] | None
) -> dict[str, Any]:
    config = getattr(model, "config", None)
    return {
        "architecture": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "num_hidden_layers": _config_int(config, "num_hidden_layers"),
        "hidden_size": _config_int(config, "hidden_size"),
        "modules": {entry.module: _stored_shape(model, entry) for entry in entries},
        "source": source,
    }


def _config_int(config: Any, name: str) -> int | None:
    value = getattr(config, name, None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _stored_shape(model: nn.Module, entry: ManifestWeight) -> list[int]:
    """``[out, in]`` of a down-projection, or ``[experts, out, in]`` of a fused parameter."""
    element = WeightElement.resolve(model, entry.coordinate)
    if not element.is_fused_expert:
        return list(oriented_shape(element.module))
    experts, rows, cols = element.parameter.shape
    if getattr(element.module, "is_transposed", False) is True:
        rows, cols = cols, rows
    return [experts, rows, cols]


def _source(source: str | Path | None) -> dict[str, Any] | None:
    """A file's sha256 (streamed), or a revision string; a path that is not a file is an error."""
    if source is None:
        return None
    path = Path(source)
    if path.is_file():
        return {"kind": "file", "name": path.name, "bytes": path.stat().st_size, **_sha256(path)}
    looks_like_path = isinstance(source, Path) or path.exists() or "/" in str(source)
    if looks_like_path or str(source).endswith(_WEIGHT_FILE_SUFFIXES):
        raise ValueError(f"source {str(source)!r} is not a file; pass a weights file or a revision")
    if not isinstance(source, str) or not source:
        raise ValueError(f"source must be a file path or a revision string, got {source!r}")
    return {"kind": "revision", "revision": source}


def _sha256(path: Path) -> dict[str, str]:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return {"sha256": digest.hexdigest()}


def _to_bits(value: torch.Tensor) -> str:
    """The element's bytes as an unsigned hex integer (``bfloat16`` 2.0 is ``"4000"``)."""
    raw = value.detach().cpu().reshape(1).view(torch.uint8).numpy().tobytes()
    return f"{int.from_bytes(raw, sys.byteorder):0{2 * len(raw)}x}"


def _from_bits(bits: str, dtype: torch.dtype) -> torch.Tensor:
    size = torch.empty((), dtype=dtype).element_size()
    raw = bytearray(int(bits, 16).to_bytes(size, sys.byteorder))
    return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(()).clone()


# -- reading -------------------------------------------------------------------------------


def read_manifest(path: str | Path) -> Manifest:
    """Read and validate a manifest; one ``ValueError`` names the first problem found."""
    return manifest_from_dict(read_json(path), where=str(path))


def manifest_from_dict(data: Any, *, where: str = "manifest") -> Manifest:
    """Validate a parsed manifest (schema version, required fields, types)."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{where}: not a super-weight manifest ('format' is not {FORMAT!r})")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(
            f"{where}: unsupported schema_version {data.get('schema_version')!r}; "
            f"this version reads {SCHEMA_VERSION}"
        )
    model = _field(data, "model", dict, where)
    _check_identity(model, where)
    rows = _field(data, "super_weights", list, where)
    weights = tuple(
        _weight_from_dict(row, f"{where}: super_weights[{i}]") for i, row in enumerate(rows)
    )
    for weight in weights:
        if weight.module not in model["modules"]:
            raise ValueError(f"{where}: model.modules lacks {weight.module!r}")
    detection = data.get("detection")
    if detection is not None and not isinstance(detection, dict):
        raise ValueError(f"{where}: 'detection' must be an object or null")
    return Manifest(model, weights, detection)


def _field(data: dict[str, Any], name: str, kind: type | tuple[type, ...], where: str) -> Any:
    if name not in data:
        raise ValueError(f"{where}: missing field {name!r}")
    value = data[name]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise ValueError(f"{where}: field {name!r} has the wrong type: {value!r}")
    return value


def _optional(data: dict[str, Any], name: str, kind: type, where: str) -> Any:
    if name not in data:
        raise ValueError(f"{where}: missing field {name!r}")
    return None if data[name] is None else _field(data, name, kind, where)


def _check_identity(model: dict[str, Any], where: str) -> None:
    where = f"{where}: model"
    _field(model, "architecture", str, where)
    _optional(model, "model_type", str, where)
    _optional(model, "num_hidden_layers", int, where)
    _optional(model, "hidden_size", int, where)
    _optional(model, "source", dict, where)
    modules = _field(model, "modules", dict, where)
    for name, shape in modules.items():
        if not (isinstance(shape, list) and shape and all(_is_count(n) for n in shape)):
            raise ValueError(f"{where}: modules[{name!r}] must be a list of sizes, got {shape!r}")


def _weight_from_dict(data: Any, where: str) -> ManifestWeight:
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be an object, got {type(data).__name__}")
    dtype = _field(data, "dtype", str, where)
    if dtype not in _DTYPES:
        raise ValueError(f"{where}: dtype {dtype!r} is not one of {sorted(_DTYPES)}")
    weight = ManifestWeight(
        module=_field(data, "module", str, where),
        row=_count(data, "row", where),
        col=_count(data, "col", where),
        expert=_optional(data, "expert", int, where),
        value=_number_or_none(data, where),
        dtype=dtype,
        bits=_bits(data, _DTYPES[dtype], where),
        activation_channel=_count(data, "activation_channel", where),
        token_position=_optional(data, "token_position", int, where),
    )
    stored = float(weight.tensor())
    if math.isfinite(stored) and stored != weight.value:
        raise ValueError(f"{where}: value {weight.value!r} disagrees with its bits ({stored!r})")
    return weight


def _count(data: dict[str, Any], name: str, where: str) -> int:
    value = _field(data, name, int, where)
    if value < 0:
        raise ValueError(f"{where}: field {name!r} must be >= 0, got {value}")
    return value


def _number_or_none(data: dict[str, Any], where: str) -> float | None:
    value = _optional(data, "value", (int, float), where)
    if isinstance(value, bool):
        raise ValueError(f"{where}: field 'value' has the wrong type: {value!r}")
    return None if value is None else float(value)


def _bits(data: dict[str, Any], dtype: torch.dtype, where: str) -> str:
    bits = _field(data, "bits", str, where)
    width = 2 * torch.empty((), dtype=dtype).element_size()
    if len(bits) != width or any(c not in "0123456789abcdef" for c in bits):
        raise ValueError(f"{where}: bits {bits!r} are not {width} lowercase hex digits")
    return bits


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# -- applying ------------------------------------------------------------------------------


def apply_manifest(model: nn.Module, manifest: Manifest | str | Path) -> ApplyReport:
    """Write the manifest's exact values into ``model`` (e.g. after quantizing it).

    Every check runs before the first write: the architecture, the config sizes and each
    module's shape must match, and each value must fit the model's dtype. Values are
    converted to the stored dtype (bit-exact when it is the manifest's). If a write fails,
    the elements already written get their old values back.
    """
    if not isinstance(manifest, Manifest):
        manifest = read_manifest(manifest)
    _check_model(model, manifest)
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


def _check_model(model: nn.Module, manifest: Manifest) -> None:
    identity = manifest.model
    if type(model).__name__ != identity["architecture"]:
        raise ValueError(
            f"the manifest is for {identity['architecture']}, not {type(model).__name__}"
        )
    config = getattr(model, "config", None)
    found = {
        "model_type": getattr(config, "model_type", None),
        "num_hidden_layers": _config_int(config, "num_hidden_layers"),
        "hidden_size": _config_int(config, "hidden_size"),
    }
    for name, value in found.items():
        if identity[name] is not None and identity[name] != value:
            raise ValueError(
                f"the manifest is for {name} {identity[name]!r}, the model has {value!r}"
            )
    for weight in manifest.super_weights:
        shape = _stored_shape(model, weight)
        expected = identity["modules"][weight.module]
        if shape != expected:
            raise ValueError(f"{weight.module} has shape {shape}, the manifest says {expected}")


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
    changed = old is not None and _to_bits(old) != _to_bits(new)
    return AppliedWeight(
        weight.module,
        weight.row,
        weight.col,
        weight.expert,
        None if old is None else float(old),
        float(new),
        changed,
    )
