"""Block round-to-nearest fake quantization of one tensor, held-out elements kept exact.

The paper's recipe (arXiv 2411.07191, section 4): quantize each block of a weight with
round-to-nearest (RTN); optionally clip ordinary outliers first so the block's range is
tighter; but hold the super weights out of both (out of the range and out of the clip) and
write them back in full precision afterwards.

Everything here is *fake* quantization: a tensor is quantized and dequantized back to its
own dtype and shape, so a model runs as usual and only the rounding error is simulated.
All block work is vectorized: :func:`to_blocks` reshapes a tensor to ``[blocks, block
elements]`` for an explicit block size, and every statistic is one reduction along the last
axis. These are torchao's primitives in small: :func:`choose_qparams` and
:func:`fake_quantize` work on blocks, :func:`quantize_tensor` chains them for one tensor and
one :class:`~sw_hooks.quant.config.QuantConfig`, and :func:`quantize_matrices` does the same
for each matrix of a stack (the experts of a fused mixture-of-experts parameter) at once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from sw_hooks.quant.config import (
    ClipConfig,
    IQRClip,
    QuantConfig,
    ZScoreClip,
    check_bits,
    require_config,
)

__all__ = [
    "QuantParams",
    "choose_qparams",
    "fake_quantize",
    "from_blocks",
    "holdout_mask",
    "quantize_matrices",
    "quantize_tensor",
    "to_blocks",
]


# --------------------------------------------------------------------------- blocks


def _pad_to(length: int, multiple: int) -> int:
    return -(-length // multiple) * multiple - length


def to_blocks(
    tensor: torch.Tensor, block: tuple[int, ...], *, stacked: bool = False
) -> torch.Tensor:
    """``[blocks, elements]``: 1-D chunks of the flattened tensor, or 2-D tiles (zero padded).

    ``block`` is ``(n,)`` for chunks of ``n`` elements or ``(rows, cols)`` for tiles of a 2-D
    tensor (:attr:`QuantConfig.block <sw_hooks.quant.config.QuantConfig.block>`). With
    ``stacked``, ``tensor[i]`` is blocked on its own (padded at its own end), so no block
    holds elements of two members: the blocks of member 0 come first.

    Example:
        >>> to_blocks(torch.arange(6.0).reshape(2, 3), (4,)).tolist()
        [[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 0.0, 0.0]]
        >>> to_blocks(torch.arange(6.0).reshape(2, 3), (4,), stacked=True).tolist()
        [[0.0, 1.0, 2.0, 0.0], [3.0, 4.0, 5.0, 0.0]]
    """
    members = tensor.reshape(tensor.shape[0] if stacked else 1, *tensor.shape[int(stacked) :])
    if len(block) == 1:
        flat = members.reshape(members.shape[0], -1)
        padded = nn.functional.pad(flat, (0, _pad_to(flat.shape[1], block[0])))
        return padded.reshape(-1, block[0])
    rows, cols = block
    _, height, width = members.shape
    padded = nn.functional.pad(members, (0, _pad_to(width, cols), 0, _pad_to(height, rows)))
    count, tall, wide = padded.shape
    tiles = padded.reshape(count, tall // rows, rows, wide // cols, cols)
    return tiles.permute(0, 1, 3, 2, 4).reshape(-1, rows * cols)


def from_blocks(
    blocks: torch.Tensor, block: tuple[int, ...], shape: Sequence[int], *, stacked: bool = False
) -> torch.Tensor:
    """Inverse of :func:`to_blocks`: drop the padding and restore ``shape``."""
    shape = tuple(shape)
    members = shape[0] if stacked else 1
    if len(block) == 1:
        per_member = math.prod(shape) // max(members, 1)
        return blocks.reshape(members, -1)[:, :per_member].reshape(shape)
    rows, cols = block
    height, width = shape[-2:]
    tile_rows, tile_cols = -(-height // rows), -(-width // cols)
    tiles = blocks.reshape(members, tile_rows, tile_cols, rows, cols).permute(0, 1, 3, 2, 4)
    padded = tiles.reshape(members, tile_rows * rows, tile_cols * cols)
    return padded[:, :height, :width].reshape(shape)


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


def _clip_blocks(
    blocks: torch.Tensor, valid: torch.Tensor, clip: ClipConfig, tensors: int = 1
) -> torch.Tensor:
    """The blocks with outliers clamped; invalid entries (padding, holdout) neither count nor change.

    ``tensors``: how many tensors the blocks come from (in order, equally many blocks each),
    for clipping ``per="tensor"``.
    """
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
        each = _kth_largest(
            magnitudes.reshape(tensors, -1), valid.reshape(tensors, -1), clip.fraction
        )
        threshold = each.repeat_interleave(blocks.shape[0] // tensors).unsqueeze(-1)
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
    tensor: torch.Tensor,
    config: QuantConfig,
    *,
    holdout: torch.Tensor | Iterable[Sequence[int]] | None = None,
) -> torch.Tensor:
    """Fake-quantize ``tensor`` blockwise with round-to-nearest: same shape and dtype, new tensor.

    A block size that does not divide the tensor is zero padded; padding never enters a
    block's range or statistics.

    Args:
        tensor: a floating-point tensor (any shape for 1-D blocks; 2-D for tiles).
        config: bits, block, symmetry and clipping (see :class:`QuantConfig`).
        holdout: elements of ``tensor`` to keep, as a boolean mask of its shape or as index
            tuples into it; they are left out of their block's range and of clipping, and
            come back bit-exact.

    Raises:
        TypeError: ``config`` is not a :class:`QuantConfig`, or ``tensor`` is not floating.
        ValueError: a holdout index outside ``tensor``, or 2-D tiles on a tensor that is not 2-D.

    Example:
        >>> w = torch.tensor([0.0, 0.1, 0.2, 0.3, 3.0])
        >>> quantize_tensor(w, QuantConfig(2, 5)).tolist()
        [0.0, 0.0, 0.0, 0.0, 3.0]
        >>> quantize_tensor(w, QuantConfig(2, 5), holdout=[(4,)]).tolist()
        [0.0, 0.10000000149011612, 0.20000000298023224, 0.30000001192092896, 3.0]
    """
    config = require_config(config)
    _check_floating(tensor)
    if config.block_shape == "2d" and tensor.dim() != 2:
        raise ValueError(f"2-D tiles need a 2-D tensor, got shape {tuple(tensor.shape)}")
    return _quantize(tensor, config, holdout, stacked=False)


def quantize_matrices(
    stack: torch.Tensor,
    config: QuantConfig,
    *,
    holdout: torch.Tensor | Iterable[Sequence[int]] | None = None,
) -> torch.Tensor:
    """Fake-quantize each matrix of ``stack [n, out, in]`` on its own, in one vectorized pass.

    ``result[i]`` equals ``quantize_tensor(stack[i], config, holdout=...)``: blocks (and
    per-tensor clipping) never reach from one matrix into the next, as for the experts of a
    fused mixture-of-experts parameter.

    Args:
        stack: a floating-point ``[n, out, in]`` tensor.
        config: as for :func:`quantize_tensor`.
        holdout: elements of ``stack`` to keep, as a boolean mask of its shape or as
            ``(i, row, col)`` index tuples.

    Raises:
        TypeError: ``config`` is not a :class:`QuantConfig`, or ``stack`` is not floating.
        ValueError: ``stack`` is not 3-D, or a holdout index lies outside it.

    Example:
        >>> stack, config = torch.randn(4, 8, 8), QuantConfig(3, 48)
        >>> torch.equal(quantize_matrices(stack, config)[1], quantize_tensor(stack[1], config))
        True
    """
    config = require_config(config)
    _check_floating(stack)
    if stack.dim() != 3:
        raise ValueError(f"expected a [n, out, in] stack of matrices, got {tuple(stack.shape)}")
    return _quantize(stack, config, holdout, stacked=True)


def _check_floating(tensor: object) -> None:
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        raise TypeError(
            f"expected a floating-point tensor, got {getattr(tensor, 'dtype', type(tensor))}"
        )


def _quantize(
    tensor: torch.Tensor,
    config: QuantConfig,
    holdout: torch.Tensor | Iterable[Sequence[int]] | None,
    *,
    stacked: bool,
) -> torch.Tensor:
    """Block RTN of ``tensor`` (of each ``tensor[i]`` on its own when ``stacked``)."""
    block = config.block
    held = None if holdout is None else holdout_mask(tensor.shape, holdout).to(tensor.device)
    work_dtype = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    blocks = to_blocks(tensor.detach().to(work_dtype), block, stacked=stacked)
    valid = None
    if held is not None or blocks.numel() != tensor.numel():
        # Padding enters as zeros in ``keep`` too, so it is invalid like a held-out element.
        keep = torch.ones_like(tensor, dtype=work_dtype) if held is None else (~held).to(work_dtype)
        valid = to_blocks(keep, block, stacked=stacked) > 0
    if config.clip is not None:
        all_valid = torch.ones_like(blocks, dtype=torch.bool) if valid is None else valid
        tensors = tensor.shape[0] if stacked else 1
        blocks = _clip_blocks(blocks, all_valid, config.clip, tensors)
    params = choose_qparams(blocks, config.bits, symmetric=config.symmetric, valid=valid)
    quantized = fake_quantize(blocks, params)
    result = from_blocks(quantized, block, tensor.shape, stacked=stacked).to(tensor.dtype)
    return result if held is None else torch.where(held, tensor.detach(), result)
