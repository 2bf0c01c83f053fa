"""The super-weight manifest format: its types, each element's exact bits, reading and validating it.

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


A manifest is written from a model by :func:`sw_hooks.export.manifest_write.write_manifest` and
applied to one by :func:`sw_hooks.export.manifest_apply.apply_manifest`; :func:`read_manifest`
refuses a file that does not follow the schema with one ``ValueError`` naming the problem.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sw_hooks.core.access import Coordinate
from sw_hooks.core.results import read_json

FORMAT = "sw_hooks.super_weight_manifest"
SCHEMA_VERSION = 1

DTYPES: dict[str, torch.dtype] = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
}
"""The dtypes a manifest stores, by name (``"bfloat16"``)."""


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
        return from_bits(self.bits, DTYPES[self.dtype])

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


def to_bits(value: torch.Tensor) -> str:
    """The element's bytes as an unsigned hex integer (``bfloat16`` 2.0 is ``"4000"``)."""
    raw = value.detach().cpu().reshape(1).view(torch.uint8).numpy().tobytes()
    return f"{int.from_bytes(raw, sys.byteorder):0{2 * len(raw)}x}"


def from_bits(bits: str, dtype: torch.dtype) -> torch.Tensor:
    """The 0-d tensor of ``dtype`` whose bytes are ``bits`` (the inverse of :func:`to_bits`)."""
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
    if dtype not in DTYPES:
        raise ValueError(f"{where}: dtype {dtype!r} is not one of {sorted(DTYPES)}")
    weight = ManifestWeight(
        module=_field(data, "module", str, where),
        row=_count(data, "row", where),
        col=_count(data, "col", where),
        expert=_optional(data, "expert", int, where),
        value=_number_or_none(data, where),
        dtype=dtype,
        bits=_bits(data, DTYPES[dtype], where),
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
