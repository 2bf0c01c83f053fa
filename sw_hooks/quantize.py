"""Block round-to-nearest fake quantization that holds super weights out.

The paper's recipe (arXiv 2411.07191, section 4): quantize each block of a weight with
round-to-nearest (RTN); optionally clip ordinary outliers first so the block's range is
tighter; but hold the super weights out of both (out of the range and out of the clip) and
write them back in full precision afterwards. Activations are quantized per token with the
super activation replaced by the token's median before quantizing and restored after.

Everything here is *fake* quantization: a tensor is quantized and dequantized back to its
own dtype and shape, so the model runs as usual and only the rounding error is simulated.
All block work is vectorized: a tensor is reshaped to ``[blocks, block elements]`` and
every statistic is one reduction along the last axis.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from sw_hooks.access import (
    Coordinate,
    WeightElement,
    as_expert_coordinate,
    as_triple,
    oriented_shape,
    oriented_weight,
)
from sw_hooks.locate import is_linear_like, layer_index

MIN_BITS = 2
MAX_BITS = 8

BlockShape = Literal["1d", "2d"]
BlockSize = int | tuple[int, int]
ModuleFilter = Callable[[str, nn.Module], bool]


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
    if len(sizes) != (1 if block_shape == "1d" else 2):
        raise ValueError(
            f"a {block_shape} block size has {len(sizes)} too many dimensions: {block_size!r}"
        )
    for size in sizes:
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise ValueError(f"block size must be a positive integer, got {block_size!r}")
    return tuple(sizes)


# --------------------------------------------------------------------------- blocks


def _pad_to(length: int, multiple: int) -> int:
    return -(-length // multiple) * multiple - length


def _to_blocks(tensor: torch.Tensor, block: tuple[int, ...]) -> torch.Tensor:
    """``[blocks, elements]``: 1-D chunks of the flattened tensor, or 2-D tiles (zero padded)."""
    if len(block) == 1:
        flat = tensor.reshape(-1)
        return nn.functional.pad(flat, (0, _pad_to(flat.numel(), block[0]))).reshape(-1, block[0])
    rows, cols = block
    height, width = tensor.shape
    padded = nn.functional.pad(tensor, (0, _pad_to(width, cols), 0, _pad_to(height, rows)))
    tiles = padded.reshape(padded.shape[0] // rows, rows, padded.shape[1] // cols, cols)
    return tiles.permute(0, 2, 1, 3).reshape(-1, rows * cols)


def _from_blocks(blocks: torch.Tensor, block: tuple[int, ...], shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`_to_blocks`: drop the padding and restore ``shape``."""
    if len(block) == 1:
        return blocks.reshape(-1)[: math.prod(shape)].reshape(shape)
    rows, cols = block
    height, width = shape
    tile_rows, tile_cols = -(-height // rows), -(-width // cols)
    tiles = blocks.reshape(tile_rows, tile_cols, rows, cols).permute(0, 2, 1, 3)
    return tiles.reshape(tile_rows * rows, tile_cols * cols)[:height, :width]


# --------------------------------------------------------------------------- masked statistics


def _masked_quantile(values: torch.Tensor, valid: torch.Tensor, q: float) -> torch.Tensor:
    """Per-row ``q`` quantile over the valid entries (linear interpolation, like torch.quantile).

    Sorting replaces ``torch.nanquantile``, which refuses tensors of more than 2**24 elements.
    Rows with no valid entry give 0.
    """
    ordered = torch.where(valid, values, torch.full_like(values, math.inf)).sort(dim=-1).values
    count = valid.sum(dim=-1, keepdim=True)
    position = q * (count - 1).clamp(min=0).to(values.dtype)
    lower = position.floor().long()
    upper = (lower + 1).clamp(max=(count - 1).clamp(min=0))
    low_value = ordered.gather(-1, lower)
    high_value = ordered.gather(-1, upper)
    result = low_value + (high_value - low_value) * (position - lower.to(values.dtype))
    return torch.where(count > 0, result, torch.zeros_like(result)).squeeze(-1)


def _kth_largest(magnitudes: torch.Tensor, valid: torch.Tensor, fraction: float) -> torch.Tensor:
    """Per row, the largest valid magnitude left once the top ``fraction`` is set aside."""
    ordered = torch.where(valid, magnitudes, torch.full_like(magnitudes, -1.0))
    ordered = ordered.sort(dim=-1, descending=True).values
    count = valid.sum(dim=-1, keepdim=True)
    clipped = (
        (count.to(torch.float64) * fraction).floor().long().clamp(max=(count - 1).clamp(min=0))
    )
    return ordered.gather(-1, clipped).clamp(min=0).squeeze(-1)


def _clip_blocks(blocks: torch.Tensor, valid: torch.Tensor, clip: ClipConfig) -> torch.Tensor:
    """The blocks with outliers clamped; invalid entries (padding, holdout) neither count nor change."""
    if isinstance(clip, IQRClip):
        first = _masked_quantile(blocks, valid, 0.25).unsqueeze(-1)
        third = _masked_quantile(blocks, valid, 0.75).unsqueeze(-1)
        spread = clip.k * (third - first)
        clipped = torch.minimum(torch.maximum(blocks, first - spread), third + spread)
        return torch.where(valid, clipped, blocks)
    magnitudes = blocks.abs()
    if isinstance(clip, ZScoreClip):
        count = valid.sum(dim=-1, keepdim=True).clamp(min=1)
        kept = torch.where(valid, magnitudes, torch.zeros_like(magnitudes))
        mean = kept.sum(dim=-1, keepdim=True) / count
        deviation = torch.where(valid, magnitudes - mean, torch.zeros_like(magnitudes))
        # Population std (the mean of squared deviations), as numpy and the paper compute it.
        std = (deviation.square().sum(dim=-1, keepdim=True) / count).sqrt()
        threshold = mean + clip.z * std
    elif clip.per == "block":
        threshold = _kth_largest(magnitudes, valid, clip.fraction).unsqueeze(-1)
    else:
        whole = _kth_largest(magnitudes.reshape(1, -1), valid.reshape(1, -1), clip.fraction)
        threshold = whole.expand(blocks.shape[0]).unsqueeze(-1)
    clipped = torch.where(magnitudes > threshold, blocks.sign() * threshold, blocks)
    return torch.where(valid, clipped, blocks)


# --------------------------------------------------------------------------- round to nearest


@dataclass(frozen=True)
class QuantParams:
    """Per-block ``scale`` and integer ``zero_point`` (0 for symmetric), and the code range."""

    scale: torch.Tensor
    zero_point: torch.Tensor
    qmin: int
    qmax: int


def choose_qparams(
    blocks: torch.Tensor, bits: int, *, symmetric: bool = False, valid: torch.Tensor | None = None
) -> QuantParams:
    """Scale and zero-point of each row of ``blocks`` ``[n, elements]`` from its min and max.

    Asymmetric: codes ``0 .. 2**bits - 1``; the range is widened to include 0 (so zero is
    exact), ``scale = (max - min) / (2**bits - 1)`` and ``zero_point = round(-min / scale)``.
    Symmetric: codes ``-(2**(bits-1) - 1) .. 2**(bits-1) - 1`` and
    ``scale = max|w| / (2**(bits-1) - 1)``. A block of zeros gets scale 1.

    Example:
        >>> p = choose_qparams(torch.tensor([[-1.0, 0.0, 2.0]]), 2)
        >>> p.scale.tolist(), p.zero_point.tolist()
        ([[1.0]], [[1.0]])
    """
    bits = check_bits(bits)
    if valid is None:
        low, high = blocks.amin(dim=-1, keepdim=True), blocks.amax(dim=-1, keepdim=True)
    else:
        low = torch.where(valid, blocks, math.inf).amin(dim=-1, keepdim=True)
        high = torch.where(valid, blocks, -math.inf).amax(dim=-1, keepdim=True)
    # Including 0 keeps all-positive blocks representable and makes empty blocks [0, 0].
    low, high = low.clamp(max=0), high.clamp(min=0)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = torch.maximum(-low, high) / qmax
        zero_point = torch.zeros_like(scale)
        qmin = -qmax
    else:
        qmin, qmax = 0, 2**bits - 1
        scale = (high - low) / qmax
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero_point = torch.round(-low / safe).clamp(qmin, qmax)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return QuantParams(scale, zero_point, qmin, qmax)


def fake_quantize(blocks: torch.Tensor, params: QuantParams) -> torch.Tensor:
    """Quantize each row with its scale and zero-point, then dequantize."""
    codes = torch.round(blocks / params.scale) + params.zero_point
    codes = codes.clamp(params.qmin, params.qmax)
    return (codes - params.zero_point) * params.scale


def holdout_mask(shape: Sequence[int], holdout: object) -> torch.Tensor:
    """A boolean mask of ``shape`` from a mask or from index tuples, checked against the shape.

    Example:
        >>> holdout_mask((2, 3), [(1, 2)]).nonzero().tolist()
        [[1, 2]]
    """
    shape = tuple(shape)
    if isinstance(holdout, torch.Tensor) and holdout.dtype == torch.bool:
        if tuple(holdout.shape) != shape:
            raise ValueError(f"holdout mask has shape {tuple(holdout.shape)}, the weight {shape}")
        return holdout
    if isinstance(holdout, torch.Tensor):
        holdout = holdout.tolist()
    mask = torch.zeros(shape, dtype=torch.bool)
    for index in holdout:  # a handful of coordinates: validated one by one for clear errors
        index = (index,) if isinstance(index, int) else tuple(index)
        if len(index) != len(shape) or not all(isinstance(i, int) for i in index):
            raise ValueError(f"holdout index {index!r} does not index a tensor of shape {shape}")
        if not all(0 <= i < n for i, n in zip(index, shape, strict=True)):
            raise ValueError(f"holdout index {index!r} is outside a tensor of shape {shape}")
        mask[index] = True
    return mask


def quantize_tensor(
    w: torch.Tensor,
    bits: int,
    block_size: BlockSize,
    *,
    symmetric: bool = False,
    block_shape: BlockShape = "1d",
    clip: ClipConfig | str | None = None,
    holdout: torch.Tensor | Iterable[Sequence[int]] | None = None,
) -> torch.Tensor:
    """Fake-quantize ``w`` blockwise with round-to-nearest: same shape and dtype, new tensor.

    Args:
        w: a floating-point tensor (any shape for 1-D blocks; 2-D for tiles).
        bits: 2 to 8.
        block_size: elements per 1-D block (contiguous chunks of the flattened tensor, as the
            paper's code does), or the tile ``(rows, cols)`` (an int means square) for 2-D.
            A size that does not divide the tensor is zero padded; padding never enters a
            block's range or statistics.
        symmetric: symmetric signed codes instead of min-max with a zero-point.
        block_shape: ``"1d"`` or ``"2d"``.
        clip: outlier clipping applied per block before the range is taken: a
            :class:`ZScoreClip`, :class:`TopFractionClip`, :class:`IQRClip` or a string for
            :func:`parse_clip`.
        holdout: a boolean mask of ``w``'s shape or index tuples; those elements are left out
            of their block's range and of clipping, and come back bit-exact.

    Raises:
        ValueError: bits outside 2..8, a block size <= 0, an unknown clip, a holdout index
            outside ``w``, or 2-D tiles on a tensor that is not 2-D.

    Example:
        >>> w = torch.tensor([0.0, 0.1, 0.2, 0.3, 3.0])
        >>> quantize_tensor(w, 2, 5).tolist()
        [0.0, 0.0, 0.0, 0.0, 3.0]
        >>> quantize_tensor(w, 2, 5, holdout=[(4,)]).tolist()
        [0.0, 0.10000000149011612, 0.20000000298023224, 0.30000001192092896, 3.0]
    """
    bits = check_bits(bits)
    block = _check_block(block_size, block_shape)
    clip = parse_clip(clip)
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise TypeError(f"expected a floating-point tensor, got {getattr(w, 'dtype', type(w))}")
    if block_shape == "2d" and w.dim() != 2:
        raise ValueError(f"2-D tiles need a 2-D tensor, got shape {tuple(w.shape)}")
    held = None if holdout is None else holdout_mask(w.shape, holdout).to(w.device)
    work_dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    blocks = _to_blocks(w.detach().to(work_dtype), block)
    valid = None
    if held is not None or blocks.numel() != w.numel():
        # Padding enters as zeros in ``keep`` too, so it is invalid like a held-out element.
        keep = torch.ones_like(w, dtype=work_dtype) if held is None else (~held).to(work_dtype)
        valid = _to_blocks(keep, block) > 0
    if clip is not None:
        all_valid = torch.ones_like(blocks, dtype=torch.bool) if valid is None else valid
        blocks = _clip_blocks(blocks, all_valid, clip)
    params = choose_qparams(blocks, bits, symmetric=symmetric, valid=valid)
    result = _from_blocks(fake_quantize(blocks, params), block, w.shape).to(w.dtype)
    return result if held is None else torch.where(held, w.detach(), result)


# --------------------------------------------------------------------------- whole models


def _excluded_weights(model: nn.Module) -> set[int]:
    """Ids of the embedding and LM-head weights (tied or not), which are not quantized by default."""
    excluded = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        if module is not None and isinstance(getattr(module, "weight", None), torch.Tensor):
            excluded.add(id(module.weight))
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            excluded.add(id(module.weight))
    return excluded


def select_modules(
    model: nn.Module, modules: str | Sequence[str] | ModuleFilter | None = None
) -> dict[str, nn.Module]:
    """The Linear-like modules to quantize, by name.

    Args:
        model: the model.
        modules: ``None`` for every Linear-like module but the embeddings and the LM head;
            a glob (``"*.mlp.*"``); a list of exact names; or ``filter(name, module) -> bool``
            (torchao's ``filter_fn``).

    Raises:
        ValueError: a listed name is missing or not Linear-like, or nothing was selected.

    Example:
        >>> from sw_hooks.testing import tiny_model
        >>> len(select_modules(tiny_model("llama", num_layers=2)))
        14
    """
    excluded = _excluded_weights(model)
    candidates = {
        name: module
        for name, module in model.named_modules()
        if name and is_linear_like(module) and not isinstance(module, nn.Embedding)
    }
    if modules is None:
        chosen = {n: m for n, m in candidates.items() if id(m.weight) not in excluded}
    elif isinstance(modules, str):
        chosen = {n: m for n, m in candidates.items() if fnmatch.fnmatchcase(n, modules)}
    elif callable(modules):
        chosen = {n: m for n, m in candidates.items() if modules(n, m)}
    else:
        missing = [n for n in modules if n not in candidates]
        if missing:
            raise ValueError(f"not Linear-like modules of this model: {missing[:5]}")
        chosen = {n: candidates[n] for n in modules}
    if not chosen:
        raise ValueError(f"no Linear-like module selected by modules={modules!r}")
    for name, module in chosen.items():
        if module.weight.device.type == "meta" or type(module.weight).__name__ == "DTensor":
            raise ValueError(
                f"{name}.weight is offloaded or sharded; quantize a materialized model"
            )
    return chosen


class QuantizedModel:
    """What :func:`quantize_model` changed, and the originals to put back.

    ``restore()`` writes every original weight back bit for bit (idempotent); the object
    is also a context manager that restores on exit.
    """

    def __init__(self, originals: dict[str, tuple[nn.Module, torch.Tensor]], held_out: int):
        self._originals = originals
        self.held_out = held_out

    @property
    def modules(self) -> list[str]:
        return list(self._originals)

    @property
    def active(self) -> bool:
        return bool(self._originals)

    def restore(self) -> None:
        """Put every original weight back (bit-exact), newest first."""
        with torch.no_grad():
            while self._originals:
                name = next(reversed(self._originals))
                module, original = self._originals.pop(name)
                module.weight.copy_(original)

    def __enter__(self) -> QuantizedModel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.restore()


def resolve_holdout(
    model: nn.Module, holdout: Iterable[Coordinate] | None
) -> dict[str, list[tuple[int, int]]]:
    """``{module: [(row, col), ...]}`` in ``[out, in]`` order, every coordinate checked.

    Raises:
        ValueError: a module is missing or a coordinate lies outside its weight.

    Example:
        >>> from sw_hooks.testing import tiny_model
        >>> resolve_holdout(tiny_model("llama", num_layers=1), [("model.layers.0.mlp.down_proj", 3, 5)])
        {'model.layers.0.mlp.down_proj': [(3, 5)]}
    """
    if holdout is None:
        return {}
    if hasattr(holdout, "super_weights"):  # a DetectionResult: hold out every candidate
        holdout = holdout.super_weights
    grouped: dict[str, list[tuple[int, int]]] = {}
    for coordinate in holdout:
        if as_expert_coordinate(coordinate)[1] is not None:
            raise ValueError(
                f"{coordinate!r} is inside a fused expert parameter, which quantize_model does "
                "not quantize (it quantizes 2-D linear weights); leave it out of the holdout"
            )
        element = WeightElement.resolve(model, as_triple(coordinate))
        grouped.setdefault(element.module_name, []).append((element.row, element.col))
    return grouped


def quantize_model(
    model: nn.Module,
    bits: int,
    block_size: BlockSize,
    *,
    modules: str | Sequence[str] | ModuleFilter | None = None,
    clip: ClipConfig | str | None = None,
    holdout: Iterable[Coordinate] | None = None,
    symmetric: bool = False,
    block_shape: BlockShape = "1d",
) -> QuantizedModel:
    """Fake-quantize the chosen linear weights in place; hold the super weights out.

    Blocks run along each weight in ``[out, in]`` order (GPT-2's transposed ``Conv1D``
    included), so block boundaries and holdout coordinates mean the same on every
    architecture. Every argument and coordinate is checked before any weight is touched.

    Args:
        model: the model (its weights are changed in place).
        bits, block_size, clip, symmetric, block_shape: as for :func:`quantize_tensor`.
        modules: which modules (see :func:`select_modules`); default: every linear weight
            but the embeddings and the LM head.
        holdout: super weights (``SuperWeight`` objects, ``(module, row, col)`` tuples, or a
            ``DetectionResult``) kept in full precision. Coordinates in modules that are not
            quantized are checked and then need nothing more.

    Returns:
        A :class:`QuantizedModel`; ``.restore()`` undoes everything without reloading.

    Example:
        >>> from sw_hooks.testing import tiny_model
        >>> model = tiny_model("llama", num_layers=1)
        >>> sw = ("model.layers.0.mlp.down_proj", 3, 5)
        >>> with quantize_model(model, 4, 64, clip="zscore:6", holdout=[sw]) as q:
        ...     len(q.modules)
        7
    """
    bits = check_bits(bits)
    _check_block(block_size, block_shape)
    clip = parse_clip(clip)
    chosen = select_modules(model, modules)
    held = resolve_holdout(model, holdout)
    originals: dict[str, tuple[nn.Module, torch.Tensor]] = {}
    handle = QuantizedModel(originals, held_out=sum(len(held.get(n, ())) for n in chosen))
    try:
        with torch.no_grad():
            for name, module in chosen.items():
                originals[name] = (module, module.weight.detach().clone())
                view = oriented_weight(module)
                mask = holdout_mask(oriented_shape(module), held.get(name, ()))
                quantized = quantize_tensor(
                    view,
                    bits,
                    block_size,
                    symmetric=symmetric,
                    block_shape=block_shape,
                    clip=clip,
                    holdout=mask,
                )
                view.copy_(quantized)
    except BaseException:
        handle.restore()
        raise
    return handle


# --------------------------------------------------------------------------- activations


def quantize_activation_tokens(
    x: torch.Tensor, bits: int = 8, *, holdout_channels: Sequence[int] = ()
) -> torch.Tensor:
    """Per-token symmetric fake quantization of ``x [..., channels]``, channels held out.

    Each held-out channel is first replaced by its token's median (so it no longer sets the
    token's scale), the token is quantized, and the held-out values are written back
    unchanged: the paper's REPLACE, Q, Q^-1, RESTORE.

    Example:
        >>> x = torch.tensor([[0.1, -0.2, 0.3, 50.0]])
        >>> quantize_activation_tokens(x, 8, holdout_channels=[3])[0, 3].item()
        50.0
    """
    bits = check_bits(bits)
    work = x.detach().float()
    channels = list(holdout_channels)
    if channels:
        median = work.median(dim=-1, keepdim=True).values
        work = work.clone()
        work[..., channels] = median.expand(*median.shape[:-1], len(channels))
    params = choose_qparams(work.reshape(-1, work.shape[-1]), bits, symmetric=True)
    result = fake_quantize(work.reshape(-1, work.shape[-1]), params).reshape(x.shape)
    if channels:
        result[..., channels] = x.detach().float()[..., channels]
    return result.to(x.dtype)


def _activation_holdout(
    model: nn.Module, chosen: dict[str, nn.Module], holdout: Iterable[Coordinate] | None
) -> dict[str, list[int]]:
    """Input channels to hold out, per module.

    A super weight ``(module, row, col)`` multiplies the input spike at channel ``col`` of its
    own module and writes the super activation into residual channel ``row``; the residual
    stream then carries it into the later layers. So ``col`` is held out at ``module``'s
    input, and ``row`` at the input of every module of hidden width in a later layer (an
    attention output projection of hidden width is included: widths cannot tell it apart).
    """
    channels: dict[str, set[int]] = {}
    for name, coordinates in resolve_holdout(model, holdout).items():
        hidden = oriented_shape(model.get_submodule(name))[0]
        source_layer = layer_index(name)
        later = {
            other: module
            for other, module in chosen.items()
            if oriented_shape(module)[1] == hidden
            and (source_layer is None or (layer_index(other) or -1) > source_layer)
        }
        for row, col in coordinates:
            channels.setdefault(name, set()).add(col)
            for other in later:
                channels.setdefault(other, set()).add(row)
    return {name: sorted(found) for name, found in channels.items() if name in chosen}


@contextmanager
def quantize_activations(
    model: nn.Module,
    bits: int = 8,
    *,
    modules: str | Sequence[str] | ModuleFilter | None = None,
    holdout: Iterable[Coordinate] | None = None,
) -> Iterator[dict[str, list[int]]]:
    """Fake-quantize the inputs of the chosen linear modules per token (W8A8 style).

    With ``holdout`` (super weights), the super activation's channels are replaced by the
    median before quantizing and restored after; see :func:`_activation_holdout` for which
    channels. Hooks are removed on exit, even after an exception.

    Yields:
        ``{module: held-out input channels}``.

    Example:
        >>> from sw_hooks.testing import tiny_model
        >>> model = tiny_model("llama", num_layers=1)
        >>> with quantize_activations(model, 8):
        ...     logits = model(torch.tensor([[1, 2, 3]])).logits
    """
    bits = check_bits(bits)
    chosen = select_modules(model, modules)
    held = _activation_holdout(model, chosen, holdout)
    handles: list[RemovableHandle] = []

    def hook_for(name: str) -> Callable[[nn.Module, tuple], tuple]:
        channels = held.get(name, [])

        def quantize_input(module: nn.Module, args: tuple) -> tuple:
            return (quantize_activation_tokens(args[0], bits, holdout_channels=channels), *args[1:])

        return quantize_input

    try:
        for name, module in chosen.items():
            handles.append(module.register_forward_pre_hook(hook_for(name)))
        yield held
    finally:
        while handles:
            handles.pop().remove()


# --------------------------------------------------------------------------- sweeps


@dataclass(frozen=True)
class SweepRun:
    """One quantization setting's score, with or without the super weights held out."""

    bits: int
    block_size: int
    clip: str
    holdout: bool
    perplexity: float

    def to_dict(self) -> dict[str, object]:
        return {
            "bits": self.bits,
            "block_size": self.block_size,
            "clip": self.clip,
            "holdout": self.holdout,
            "perplexity": self.perplexity,
        }


def holdout_sweep(
    model: nn.Module,
    settings: Iterable[tuple[int, int, ClipConfig | str | None]],
    holdout: Iterable[Coordinate],
    measure: Callable[[], float],
    *,
    progress: Callable[[str], None] | None = None,
) -> list[SweepRun]:
    """Score the model quantized at each ``(bits, block_size, clip)``, without and with holdout.

    The model is quantized in place for each run and restored bit for bit before the next
    one (and after an exception). ``measure`` scores the quantized model; the sweep is
    blind to what it measures, so callers pass perplexity on their own tokens.

    Example:
        >>> from sw_hooks.testing import tiny_model
        >>> model = tiny_model("llama", num_layers=1)
        >>> sw = [("model.layers.0.mlp.down_proj", 3, 5)]
        >>> runs = holdout_sweep(model, [(4, 64, "zscore:6")], sw, lambda: 1.0)
        >>> [(r.block_size, r.holdout) for r in runs]
        [(64, False), (64, True)]
    """
    weights = list(holdout)
    runs = []
    for bits, block_size, clip in settings:
        clip = parse_clip(clip)
        for held in (False, True):
            with quantize_model(
                model, bits, block_size, clip=clip, holdout=weights if held else None
            ):
                value = measure()
            run = SweepRun(bits, block_size, str(clip or "none"), held, value)
            if progress:
                progress(
                    f"{bits} bits, block {block_size}, clip {run.clip}, holdout {held}: {value:.2f}"
                )
            runs.append(run)
    return runs
