"""Write a quantized GGUF file whose super-weight tensors stay at a higher precision.

llama.cpp and the tools around it ship models as GGUF. Quantizing every weight to 4 bits
rounds a super weight together with its block; the llama.cpp convention for such outliers
is to write the tensors that hold them at a wider type. :func:`export_gguf` reads a GGUF
source, copies every metadata key (tokenizer and all), quantizes each weight matrix with
gguf's own quantizers and writes the super-weight tensors at ``keep`` (``f16`` or
``q8_0``) instead. What stays at its source type follows ``llama-quantize``'s rules
(:mod:`sw_hooks.export.gguf_rules`: norms, the experts' router ``ffn_gate_inp``, position
embeddings...). A super-weight manifest (:mod:`sw_hooks.export.manifest`) applied after
loading restores the exact values on top.

Only GGUF sources are read: a transformers checkpoint is converted to GGUF first
(llama.cpp's ``convert_hf_to_gguf.py --outtype f16``), which is where the architecture's
tensor layout (such as the permuted attention rows of llama) is decided.

Example:
    >>> export = export_gguf(  # doctest: +SKIP
    ...     "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2.Q4_0.gguf", quant_type="Q4_0",
    ...     keep="f16", super_weights=[("model.layers.11.mlp.down_proj", 507, 1229)],
    ... )
    >>> export.kept  # doctest: +SKIP
    {'blk.11.ffn_down.weight': 'F16'}
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sw_hooks.core.access import Coordinate, CoordinateLike, coordinates_of
from sw_hooks.core.progress import Progress
from sw_hooks.core.results import DetectionResult
from sw_hooks.export.gguf_names import gguf_tensor_name
from sw_hooks.export.gguf_rules import allows_quantization
from sw_hooks.export.manifest import Manifest

QUANT_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "MXFP4", "BF16", "F16")
"""Types gguf's Python quantizers write (``quant_type``); the ternary types are left out."""

KEEP_TYPES = {"f16": "F16", "q8_0": "Q8_0"}
"""``keep`` names and the GGUF types the super-weight tensors are written at."""

_GGUF_MAGIC = b"GGUF"
_SKIPPED_KEYS = ("general.architecture", "general.alignment", "general.file_type")
_PROGRESS_STEPS = 10


@dataclass(frozen=True)
class GgufExport:
    """What :func:`export_gguf` wrote.

    Attributes:
        path: the GGUF file written.
        quant_type: the type of the quantized weight matrices (``"Q4_0"``).
        kept: super-weight tensors by GGUF name, with the type each was written at.
        unfit: weight matrices whose row size is not a multiple of the type's block, left
            at their source type, by name.
        bytes_written: the size of the file.
    """

    path: Path
    quant_type: str
    kept: dict[str, str] = field(default_factory=dict)
    unfit: dict[str, str] = field(default_factory=dict)
    bytes_written: int = 0


def export_gguf(
    source: str | Path,
    out: str | Path,
    *,
    quant_type: str = "Q4_0",
    keep: str | None = "f16",
    super_weights: DetectionResult | Manifest | Sequence[CoordinateLike] = (),
    progress: Progress | None = None,
) -> GgufExport:
    """Write ``source`` (a GGUF file) to ``out`` with its weight matrices at ``quant_type``.

    Args:
        source: a GGUF model file (any type gguf can dequantize).
        out: the GGUF file to write; written beside itself and renamed into place, so a
            failure never leaves a partial file.
        quant_type: one of :data:`QUANT_TYPES` (case-insensitive).
        keep: ``"f16"`` or ``"q8_0"``: the type of the tensors holding a super weight;
            ``None`` quantizes them like the rest (patch them with a manifest instead).
        super_weights: a detection result (its verified weights), a manifest, or
            coordinates with Hugging Face module names (``model.layers.11.mlp.down_proj``).
        progress: called with a line for each tenth of the tensors written.

    Raises:
        ValueError: an unknown type or keep, a source that is not GGUF, ``out`` in a
            missing folder or equal to ``source``, or a coordinate that names no tensor of
            the source or falls outside it. Every check runs before any tensor is read.
    """
    target, kept_type = check_types(quant_type, keep)
    source_path, out_path = check_paths(source, out)
    reader = _reader(source_path)
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    holding = _super_weight_tensors(reader, tensors, _coordinates(super_weights))
    kept_names = holding if kept_type is not None else set()
    architecture = str(_field_value(reader, "general.architecture") or "")
    wanted = {
        name: kept_type if name in kept_names else target
        for name, tensor in tensors.items()
        if allows_quantization(name, tensor.shape.tolist(), architecture)
    }
    unfit = {name for name, qtype in wanted.items() if not _fits(tensors[name], qtype)}
    plan = {
        name: wanted[name] if name in wanted and name not in unfit else tensor.tensor_type
        for name, tensor in tensors.items()
    }
    _write(reader, plan, out_path, target, progress or (lambda _line: None))
    return GgufExport(
        path=out_path,
        quant_type=target.name,
        kept={name: plan[name].name for name in sorted(kept_names - unfit)},
        unfit={name: plan[name].name for name in sorted(unfit)},
        bytes_written=out_path.stat().st_size,
    )


# -- checks ---------------------------------------------------------------------------------


def check_export(
    source: str | Path,
    out: str | Path,
    *,
    quant_type: str = "Q4_0",
    keep: str | None = "f16",
    super_weights: DetectionResult | Manifest | Sequence[CoordinateLike] = (),
) -> list[str]:
    """Every check of :func:`export_gguf`, reading only the source's header; nothing is written.

    For callers with slow work to do before the export (loading the model to detect its
    super weights), so that bad input fails first.

    Returns:
        The GGUF names of the tensors holding ``super_weights``, sorted.
    """
    check_types(quant_type, keep)
    source_path, _ = check_paths(source, out)
    reader = _reader(source_path)
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    return sorted(_super_weight_tensors(reader, tensors, _coordinates(super_weights)))


def check_types(quant_type: str, keep: str | None) -> tuple[Any, Any]:
    """The gguf types named by ``quant_type`` and ``keep`` (None for no keep)."""
    return _quant_type(quant_type), _keep_type(keep)


def _quant_type(name: str) -> Any:
    from gguf import GGMLQuantizationType

    if not isinstance(name, str) or name.upper() not in QUANT_TYPES:
        raise ValueError(f"unknown GGUF type {name!r}; choose one of {', '.join(QUANT_TYPES)}")
    return GGMLQuantizationType[name.upper()]


def _keep_type(keep: str | None) -> Any:
    from gguf import GGMLQuantizationType

    if keep is None:
        return None
    if not isinstance(keep, str) or keep.lower() not in KEEP_TYPES:
        raise ValueError(f"keep must be one of {', '.join(KEEP_TYPES)} or None, got {keep!r}")
    return GGMLQuantizationType[KEEP_TYPES[keep.lower()]]


def check_paths(source: str | Path, out: str | Path) -> tuple[Path, Path]:
    """``(source, out)`` as paths; refused when the source is not GGUF or ``out`` cannot be it."""
    source_path, out_path = Path(source).expanduser(), Path(out).expanduser()
    if source_path.is_dir() or (
        source_path.is_file() and source_path.suffix.lower() == ".safetensors"
    ):
        raise ValueError(
            f"{source_path} is not a GGUF file; export_gguf reads GGUF only: convert the "
            "checkpoint with llama.cpp's convert_hf_to_gguf.py --outtype f16, then export that"
        )
    if not source_path.is_file():
        raise ValueError(f"no such GGUF file: {source_path}")
    with source_path.open("rb") as handle:
        if handle.read(4) != _GGUF_MAGIC:
            raise ValueError(f"{source_path} is not a GGUF file (no GGUF magic bytes)")
    if out_path.is_dir():
        raise ValueError(f"output {out_path} is a folder; give the name of a .gguf file")
    if not out_path.parent.is_dir():
        raise ValueError(f"cannot write {out_path}: folder {out_path.parent} does not exist")
    if out_path.resolve() == source_path.resolve():
        raise ValueError(f"output {out_path} is the source file; write to another file")
    return source_path, out_path


def _coordinates(
    super_weights: DetectionResult | Manifest | Sequence[CoordinateLike],
) -> list[Coordinate]:
    if isinstance(super_weights, DetectionResult):
        return coordinates_of(super_weights.verified)
    if isinstance(super_weights, Manifest):
        return [weight.coordinate for weight in super_weights.super_weights]
    if isinstance(super_weights, str | bytes) or not isinstance(super_weights, Iterable):
        raise TypeError(
            "super_weights must be a DetectionResult, a Manifest or a sequence of "
            f"coordinates, got {type(super_weights).__name__}"
        )
    return coordinates_of(list(super_weights))


def _super_weight_tensors(
    reader: Any, tensors: dict[str, Any], coordinates: Sequence[Coordinate]
) -> set[str]:
    """The GGUF names of the tensors holding ``coordinates``, each checked against its shape."""
    architecture = _field_value(reader, "general.architecture") or "?"
    names = set()
    for coordinate in coordinates:
        try:
            name: str | None = gguf_tensor_name(coordinate.module, architecture, coordinate.expert)
        except ValueError:
            name = None
        if name is None or name not in tensors:
            raise ValueError(
                f"{coordinate.module} names no tensor of this {architecture} GGUF file"
                + (f" (looked for {name})" if name else "")
            )
        _check_inside(coordinate, name, _logical_shape(tensors[name]))
        names.add(name)
    return names


def _check_inside(coordinate: Coordinate, name: str, shape: tuple[int, ...]) -> None:
    """``shape`` is numpy order: ``[experts,] rows (out), cols (in)``."""
    rows, cols = shape[-2], shape[-1]
    experts = shape[0] if len(shape) == 3 else None
    where = f"{coordinate.module}[{coordinate.row}, {coordinate.col}]"
    if coordinate.row >= rows or coordinate.col >= cols:
        raise ValueError(f"{where} is outside {name}, whose shape is [{rows}, {cols}]")
    if coordinate.expert is not None and (experts is None or coordinate.expert >= experts):
        raise ValueError(f"{where} expert {coordinate.expert} is not in {name} {list(shape)}")


def _reader(path: Path) -> Any:
    """gguf's reader over ``path``; a truncated or corrupt file is one clear error."""
    import gguf

    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError) as error:
        raise ValueError(f"{path} is a truncated or corrupt GGUF file: {error}") from error


def _field_value(reader: Any, key: str) -> Any:
    found = reader.fields.get(key)
    return None if found is None else found.contents()


def _logical_shape(tensor: Any) -> tuple[int, ...]:
    """The tensor's element shape in numpy order (GGUF lists dimensions innermost first)."""
    return tuple(int(n) for n in reversed(tensor.shape.tolist()))


# -- planning -------------------------------------------------------------------------------


def _fits(tensor: Any, qtype: Any) -> bool:
    from gguf import GGML_QUANT_SIZES

    return _logical_shape(tensor)[-1] % GGML_QUANT_SIZES[qtype][0] == 0


def _file_type(target: Any) -> int | None:
    """``general.file_type`` for a file mostly of ``target`` (None when gguf has no name)."""
    from gguf import LlamaFileType

    name = "MOSTLY_MXFP4_MOE" if target.name == "MXFP4" else f"MOSTLY_{target.name}"
    member = LlamaFileType.__members__.get(name)
    return None if member is None else int(member)


# -- writing --------------------------------------------------------------------------------


def _write(reader: Any, plan: dict[str, Any], out: Path, target: Any, say: Progress) -> None:
    """Write metadata and tensors into a temporary file beside ``out``, then rename it."""
    handle, temporary = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    os.close(handle)
    try:
        writer = _writer(reader, temporary, target)
        _add_tensors(writer, reader, plan, say)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(temporary, out)
    finally:
        Path(temporary).unlink(missing_ok=True)


def _writer(reader: Any, path: str, target: Any) -> Any:
    """A GGUF writer holding every metadata key of ``reader``, byte for byte."""
    import gguf

    writer = gguf.GGUFWriter(path, _field_value(reader, "general.architecture"), use_temp_file=True)
    alignment = _field_value(reader, "general.alignment")
    if alignment is not None:
        writer.add_custom_alignment(int(alignment))
    for key, item in reader.fields.items():
        if key.startswith("GGUF.") or key in _SKIPPED_KEYS:
            continue
        value = _raw_value(item)
        if isinstance(value, list) and not value:
            continue  # gguf's writer cannot write an empty array; readers treat it as absent
        sub_type = item.types[-1] if item.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, item.types[0], sub_type=sub_type)
    file_type = _file_type(target)
    if file_type is not None:
        writer.add_file_type(file_type)
    return writer


def _raw_value(item: Any) -> Any:
    """A field's value with strings as their stored bytes, so no token is re-encoded."""
    from gguf import GGUFValueType

    if item.types[-1] != GGUFValueType.STRING:
        return item.contents()
    strings = [bytes(item.parts[index]) for index in item.data]
    return strings if item.types[0] == GGUFValueType.ARRAY else strings[0]


def _add_tensors(writer: Any, reader: Any, plan: dict[str, Any], say: Progress) -> None:
    total = len(reader.tensors)
    every = max(1, -(-total // _PROGRESS_STEPS))  # ceiling: at most ten lines
    for index, tensor in enumerate(reader.tensors, start=1):
        data = _converted(tensor, plan[tensor.name])
        writer.add_tensor(tensor.name, data, raw_dtype=plan[tensor.name])
        if index % every == 0 or index == total:
            say(f"tensors converted: {index}/{total}")


def _converted(tensor: Any, qtype: Any) -> np.ndarray:
    """The tensor's data at ``qtype``: its own bytes when the type does not change."""
    from gguf.quants import dequantize, quantize

    if qtype == tensor.tensor_type:
        return np.asarray(tensor.data)
    return quantize(dequantize(tensor.data, tensor.tensor_type), qtype)
