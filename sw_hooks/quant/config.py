"""How to fake-quantize a weight: one frozen, checked :class:`QuantConfig` and its clip configs.

Kept apart from the tensor work (and free of torch) so that the command line, the report
options and the library build and check the same object, with the same defaults, before
any model is loaded.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import KW_ONLY, dataclass
from typing import Any, Literal

MIN_BITS = 2
MAX_BITS = 8

BlockShape = Literal["1d", "2d"]
BlockSize = int | tuple[int, int]


# --------------------------------------------------------------------------- clipping configs


@dataclass(frozen=True)
class ZScoreClip:
    """Clamp ``|w|`` to ``mean + z * std`` of ``|w|``, per block (the paper's clipping).

    Example:
        >>> ZScoreClip(6.0)
        ZScoreClip(z=6.0)
    """

    z: float

    def __post_init__(self) -> None:
        _check_positive("z-score threshold", self.z)

    def __str__(self) -> str:
        return f"zscore:{self.z:g}"


@dataclass(frozen=True)
class TopFractionClip:
    """Clamp the largest ``fraction`` of ``|w|`` to the largest value left unclipped.

    ``per="block"`` ranks within each block; ``per="tensor"`` ranks within the whole tensor.

    Example:
        >>> TopFractionClip(0.001, per="tensor")
        TopFractionClip(fraction=0.001, per='tensor')
    """

    fraction: float
    per: Literal["block", "tensor"] = "block"

    def __post_init__(self) -> None:
        if not _is_number(self.fraction) or not 0.0 <= self.fraction < 1.0:
            raise ValueError(f"top fraction must be in [0, 1), got {self.fraction!r}")
        if self.per not in ("block", "tensor"):
            raise ValueError(f"top-fraction clipping is per 'block' or 'tensor', got {self.per!r}")

    def __str__(self) -> str:
        return f"top{'-tensor' if self.per == 'tensor' else ''}:{self.fraction:g}"


@dataclass(frozen=True)
class IQRClip:
    """Clamp ``w`` to ``[Q1 - k * IQR, Q3 + k * IQR]`` per block (Tukey's fences).

    Example:
        >>> IQRClip(3.0)
        IQRClip(k=3.0)
    """

    k: float = 1.5

    def __post_init__(self) -> None:
        _check_positive("IQR multiplier", self.k)

    def __str__(self) -> str:
        return f"iqr:{self.k:g}"


ClipConfig = ZScoreClip | TopFractionClip | IQRClip
_CLIP_KINDS: dict[str, Callable[[float], ClipConfig]] = {
    "zscore": ZScoreClip,
    "top": TopFractionClip,
    "top-tensor": lambda f: TopFractionClip(f, per="tensor"),
    "iqr": IQRClip,
}


def parse_clip(spec: str | ClipConfig | None) -> ClipConfig | None:
    """A clip config from ``"zscore:6"``, ``"top:0.001"``, ``"top-tensor:0.001"``, ``"iqr:1.5"``.

    ``None``, ``""`` and ``"none"`` mean no clipping; a config object passes through.

    Example:
        >>> parse_clip("zscore:6")
        ZScoreClip(z=6.0)
    """
    if spec is None or isinstance(spec, ZScoreClip | TopFractionClip | IQRClip):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"clip must be a clip config or a string, got {type(spec).__name__}")
    if spec.strip().lower() in ("", "none"):
        return None
    kind, _, value = spec.strip().lower().partition(":")
    if kind not in _CLIP_KINDS:
        raise ValueError(
            f"unknown clip {spec!r}; use one of {', '.join(_CLIP_KINDS)} as KIND:VALUE"
        )
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"clip {spec!r} needs a number after the colon, e.g. zscore:6") from None
    return _CLIP_KINDS[kind](number)


# --------------------------------------------------------------------------- argument checks


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_positive(what: str, value: object) -> None:
    if not _is_number(value) or value <= 0:
        raise ValueError(f"{what} must be a positive number, got {value!r}")


def check_bits(bits: object) -> int:
    """``bits`` as an int, or a clear ``ValueError`` unless it is an integer from 2 to 8."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}")
    return bits


def _check_block(block_size: object, block_shape: object) -> tuple[int, ...]:
    """The block as ``(n,)`` for 1-D or ``(rows, cols)`` for 2-D tiles."""
    if block_shape not in ("1d", "2d"):
        raise ValueError(f"block_shape must be '1d' or '2d', got {block_shape!r}")
    sizes = block_size if isinstance(block_size, tuple) else (block_size,)
    if block_shape == "2d" and len(sizes) == 1:
        sizes = sizes * 2
    dimensions = 1 if block_shape == "1d" else 2
    if len(sizes) != dimensions:
        raise ValueError(
            f"a {block_shape} block size has {dimensions} dimension(s), got {block_size!r}"
        )
    for size in sizes:
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise ValueError(f"block size must be a positive integer, got {block_size!r}")
    return tuple(sizes)


# --------------------------------------------------------------------------- the config


@dataclass(frozen=True)
class QuantConfig:
    """One block round-to-nearest setting: what torchao calls a quantization config.

    Every field is checked when the config is made (one ``ValueError`` naming the field),
    so a bad setting fails before a model is loaded or a weight is touched. ``clip`` may be
    given as a string for :func:`parse_clip` and is stored parsed, so equal settings compare
    equal however they were spelled. Fields after ``block_size`` are keyword-only.

    Attributes:
        bits: 2 to 8.
        block_size: elements per 1-D block (contiguous chunks of the flattened tensor, as
            the paper's code does), or the 2-D tile ``(rows, cols)`` (an int means square).
        block_shape: ``"1d"`` or ``"2d"``.
        symmetric: symmetric signed codes instead of min-max with a zero-point.
        clip: outlier clipping per block before the range is taken, or ``None``.

    Example:
        >>> QuantConfig(4, 64, clip="zscore:6")
        QuantConfig(bits=4, block_size=64, block_shape='1d', symmetric=False, clip=ZScoreClip(z=6.0))
        >>> QuantConfig(bits=1)
        Traceback (most recent call last):
        ...
        ValueError: bits must be an integer from 2 to 8, got 1
    """

    bits: int = 4
    block_size: BlockSize = 4096
    _: KW_ONLY
    block_shape: BlockShape = "1d"
    symmetric: bool = False
    clip: ClipConfig | None = None

    def __post_init__(self) -> None:
        check_bits(self.bits)
        _check_block(self.block_size, self.block_shape)
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"symmetric must be True or False, got {self.symmetric!r}")
        try:
            clip = parse_clip(self.clip)
        except TypeError as error:
            raise ValueError(str(error)) from None
        object.__setattr__(self, "clip", clip)

    @property
    def block(self) -> tuple[int, ...]:
        """The block as ``(n,)`` for 1-D blocks or ``(rows, cols)`` for 2-D tiles."""
        return _check_block(self.block_size, self.block_shape)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON: the clip as its string (``"zscore:6"``, ``"none"``)."""
        size = self.block_size
        return {
            "bits": self.bits,
            "block_size": list(size) if isinstance(size, tuple) else size,
            "block_shape": self.block_shape,
            "symmetric": self.symmetric,
            "clip": str(self.clip or "none"),
        }

    def __str__(self) -> str:
        size = "x".join(map(str, self.block_size)) if isinstance(self.block_size, tuple) else ""
        parts = [f"{self.bits} bits", f"block {size or self.block_size}"]
        if self.block_shape == "2d":
            parts.append("2-D tiles")
        if self.symmetric:
            parts.append("symmetric")
        return ", ".join([*parts, f"clip {self.clip or 'none'}"])


def require_config(config: object) -> QuantConfig:
    """``config`` itself, or a clear ``TypeError`` unless it is a :class:`QuantConfig`."""
    if not isinstance(config, QuantConfig):
        raise TypeError(
            f"config must be a QuantConfig (e.g. QuantConfig(bits=4, block_size=64)), "
            f"got {type(config).__name__}"
        )
    return config


def quant_grid(
    bits: Iterable[int],
    block_sizes: Iterable[BlockSize],
    clips: Iterable[ClipConfig | str | None] = (None,),
    **fixed: Any,
) -> tuple[QuantConfig, ...]:
    """Every :class:`QuantConfig` of ``bits x block_sizes x clips``, in that nesting order.

    ``fixed`` sets the other fields (``block_shape``, ``symmetric``) for all of them. Every
    config is made, so checked, before the grid is returned.

    Raises:
        ValueError: an axis is empty, or a value is not a valid setting.

    Example:
        >>> [str(c) for c in quant_grid([4], [128, 4096], ["zscore:6"])]
        ['4 bits, block 128, clip zscore:6', '4 bits, block 4096, clip zscore:6']
    """
    axes = {"bits": tuple(bits), "block size": tuple(block_sizes), "clip": tuple(clips)}
    for name, values in axes.items():
        if not values:
            raise ValueError(f"the quantization sweep needs at least one {name} value")
    return tuple(
        QuantConfig(b, size, clip=clip, **fixed)
        for b, size, clip in itertools.product(*axes.values())
    )
