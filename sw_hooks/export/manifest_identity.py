"""The model's identity as a manifest records it, and the check that a model matches it.

The identity is the model's class, its config sizes, each listed module's stored shape and,
optionally, where its weights came from (a file's sha256 or a revision). Writing records it;
applying refuses a model that does not match it before touching any weight.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from sw_hooks.core.access import WeightElement, oriented_shape
from sw_hooks.export.manifest_format import Manifest, ManifestWeight

_WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".npz")


def model_identity(
    model: nn.Module, entries: Sequence[ManifestWeight], source: dict[str, Any] | None
) -> dict[str, Any]:
    """The manifest's ``model`` object: class, config sizes, each entry's module shape, source."""
    config = getattr(model, "config", None)
    return {
        "architecture": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "num_hidden_layers": config_int(config, "num_hidden_layers"),
        "hidden_size": config_int(config, "hidden_size"),
        "modules": {entry.module: stored_shape(model, entry) for entry in entries},
        "source": source,
    }


def config_int(config: Any, name: str) -> int | None:
    """``config.<name>`` when it is an integer (a bool is not), else ``None``."""
    value = getattr(config, name, None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def stored_shape(model: nn.Module, entry: ManifestWeight) -> list[int]:
    """``[out, in]`` of a down-projection, or ``[experts, out, in]`` of a fused parameter."""
    element = WeightElement.resolve(model, entry.coordinate)
    if not element.is_fused_expert:
        return list(oriented_shape(element.module))
    experts, rows, cols = element.parameter.shape
    if getattr(element.module, "is_transposed", False) is True:
        rows, cols = cols, rows
    return [experts, rows, cols]


def source_identity(source: str | Path | None) -> dict[str, Any] | None:
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


def check_model(model: nn.Module, manifest: Manifest) -> None:
    """Refuse a model whose class, config sizes or module shapes differ from the manifest's."""
    identity = manifest.model
    if type(model).__name__ != identity["architecture"]:
        raise ValueError(
            f"the manifest is for {identity['architecture']}, not {type(model).__name__}"
        )
    config = getattr(model, "config", None)
    found = {
        "model_type": getattr(config, "model_type", None),
        "num_hidden_layers": config_int(config, "num_hidden_layers"),
        "hidden_size": config_int(config, "hidden_size"),
    }
    for name, value in found.items():
        if identity[name] is not None and identity[name] != value:
            raise ValueError(
                f"the manifest is for {name} {identity[name]!r}, the model has {value!r}"
            )
    for weight in manifest.super_weights:
        shape = stored_shape(model, weight)
        expected = identity["modules"][weight.module]
        if shape != expected:
            raise ValueError(f"{weight.module} has shape {shape}, the manifest says {expected}")
