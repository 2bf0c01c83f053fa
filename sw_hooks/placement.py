"""Where a model loads and in which dtype: ``device``, ``dtype``, ``device_map``, ``offload_folder``.

:func:`load_model` and every ``sw-hooks`` command that loads a model take the same four
choices, checked here before anything is read:

* ``device``: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"`` or ``"auto"``. ``"auto"`` is the
  first of CUDA, MPS and the CPU this machine has; on a machine without an accelerator it is
  the CPU. A device this machine lacks is refused by name.
* ``dtype``: ``"auto"`` (the checkpoint's own: the ``dtype`` its ``config.json`` records,
  else that of its first floating-point tensor, else float32), ``"float32"``, ``"bfloat16"``
  or ``"float16"`` (a ``torch.dtype`` is taken as well). A GGUF file holds quantized blocks,
  not a torch dtype; it dequantizes in float32, so ``"auto"`` is float32 there.
* ``device_map``: ``"auto"`` spreads one model over the GPUs, the CPU and, with
  ``offload_folder``, the disk (accelerate's big-model inference); it replaces ``device``.
  accelerate's other strategies (``"balanced"``, ``"balanced_low_0"``, ``"sequential"``) and,
  from Python, an explicit ``{module name: device}`` map are passed on as they are.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

AUTO = "auto"
DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DTYPE_CHOICES = (AUTO, *DTYPES)
DEVICE_MAPS = (AUTO, "balanced", "balanced_low_0", "sequential")
_MAX_HEADER_BYTES = 100 << 20
GGUF_DTYPE = torch.float32
"""What ``dtype="auto"`` means for a GGUF file: the dtype its blocks dequantize in."""

DeviceMap = str | Mapping[str, str | int | torch.device]

_CUDA_INDEXED = re.compile(r"cuda:(\d+)")
_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


@dataclass(frozen=True)
class Placement:
    """Checked loading choices: ``device`` a concrete device unless ``device_map`` is set,
    ``dtype`` ``None`` for the checkpoint's own."""

    device: torch.device | None = None
    dtype: torch.dtype | None = None
    device_map: DeviceMap | None = None
    offload_folder: Path | None = None


def placement(
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = AUTO,
    device_map: DeviceMap | None = None,
    offload_folder: str | Path | None = None,
) -> Placement:
    """Check the four loading choices together and resolve ``device``.

    ``device=None`` is the CPU, or where ``device_map`` puts each weight.

    Raises:
        ValueError: an unknown or unavailable device, an unknown dtype or device map, both
            ``device`` and ``device_map``, or ``offload_folder`` without ``device_map``.

    Example:
        >>> placement("cpu", "bfloat16").dtype
        torch.bfloat16
    """
    if not isinstance(device_map, Mapping) and device_map not in (None, *DEVICE_MAPS):
        raise ValueError(f"device map must be one of {', '.join(DEVICE_MAPS)}, got {device_map!r}")
    if device_map is not None and device is not None and str(device) != AUTO:
        raise ValueError(f"give a device ({device}) or a device map ({device_map}), not both")
    if offload_folder is not None and device_map is None:
        raise ValueError("an offload folder is used with a device map: add device_map='auto'")
    folder = _offload_folder(offload_folder)
    resolved = None if device_map is not None else resolve_device(device or "cpu")
    return Placement(resolved, resolve_dtype(dtype), device_map, folder)


def resolve_device(device: str | torch.device) -> torch.device:
    """The device ``device`` names (``"auto"``: CUDA, else MPS, else the CPU), if this machine has it.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    name = str(device).strip().lower()
    if name == AUTO:
        return auto_device()
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not _mps_available():
            raise ValueError("device mps: this machine has no MPS (Apple GPU) device")
        return torch.device("mps")
    if name == "cuda" or _CUDA_INDEXED.fullmatch(name):
        return _cuda_device(name)
    raise ValueError(f"device must be one of {', '.join(DEVICE_CHOICES)}, got {str(device)!r}")


def auto_device() -> torch.device:
    """The first of CUDA, MPS and the CPU that this machine has: the CPU without an accelerator."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def _cuda_device(name: str) -> torch.device:
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ValueError(f"device {name}: this machine has no CUDA device")
    device = torch.device(name)
    if device.index is not None and device.index >= count:
        raise ValueError(
            f"device {name}: this machine has {count} CUDA device(s), 0 to {count - 1}"
        )
    return device


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """The dtype ``dtype`` names; ``None`` for ``"auto"`` (the checkpoint's own).

    Example:
        >>> resolve_dtype("bfloat16"), resolve_dtype("auto")
        (torch.bfloat16, None)
    """
    if dtype is None or dtype == AUTO:
        return None
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {dtype}")
        return dtype
    if isinstance(dtype, str) and dtype.strip().lower() in DTYPES:
        return DTYPES[dtype.strip().lower()]
    raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {dtype!r}")


def _offload_folder(folder: str | Path | None) -> Path | None:
    if folder is None:
        return None
    path = Path(folder).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"offload folder {path} exists and is not a folder")
    return path


def checkpoint_dtype(folder: Path) -> torch.dtype:
    """The dtype a checkpoint folder was saved in: ``config.json``'s ``dtype`` (or
    ``torch_dtype``), else that of the first floating-point tensor of its first safetensors
    file (read from the header alone), else float32."""
    recorded = _config_dtype(folder / "config.json")
    if recorded is not None:
        return recorded
    files = sorted(folder.glob("*.safetensors"))
    stored = _safetensors_dtype(files[0]) if files else None
    return stored or torch.float32


def _config_dtype(config: Path) -> torch.dtype | None:
    try:
        values = json.loads(config.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(values, dict):
        return None
    name = values.get("dtype") or values.get("torch_dtype")
    return DTYPES.get(name) if isinstance(name, str) else None


def _safetensors_dtype(file: Path) -> torch.dtype | None:
    """The dtype of the first floating-point tensor listed in a safetensors header."""
    try:
        with file.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > _MAX_HEADER_BYTES:
                return None
            header = json.loads(handle.read(length))
    except (OSError, ValueError, struct.error):
        return None
    for name, entry in header.items():
        if name != "__metadata__" and isinstance(entry, dict):
            found = _SAFETENSORS_DTYPES.get(entry.get("dtype", ""))
            if found is not None:
                return found
    return None
