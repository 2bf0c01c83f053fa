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

In torchao's shape: one frozen :class:`~sw_hooks.quant.config.QuantConfig` says how to
quantize, and every entry point takes it: ``quantize_tensor(tensor, config, holdout=...)``,
``quantize_model(model, config, holdout=..., modules=...)`` and
``holdout_sweep(model, configs, super_weights, measure)``. ``holdout`` is the elements of
the tensor to keep in ``quantize_tensor``, and the super weights to keep everywhere else.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from sw_hooks.core.access import (
    Coordinate,
    CoordinateLike,
    WeightElement,
    oriented_shape,
    oriented_weight,
)
from sw_hooks.core.hooks import HookSet
from sw_hooks.core.locate import is_linear_like, layer_index
from sw_hooks.quant.config import (
    MAX_BITS,
    MIN_BITS,
    BlockShape,
    BlockSize,
    ClipConfig,
    IQRClip,
    QuantConfig,
    TopFractionClip,
    ZScoreClip,
    check_bits,
    parse_clip,
    quant_grid,
)

__all__ = [
    "MAX_BITS",
    "MIN_BITS",
    "BlockShape",
    "BlockSize",
    "ClipConfig",
    "IQRClip",
    "ModuleFilter",
    "QuantConfig",
    "QuantParams",
    "QuantizedModel",
    "SweepRun",
    "TopFractionClip",
    "ZScoreClip",
    "check_bits",
    "choose_qparams",
    "fake_quantize",
    "holdout_mask",
    "holdout_sweep",
    "parse_clip",
    "quant_grid",
    "quantize_activation_tokens",
    "quantize_activations",
    "quantize_model",
    "quantize_tensor",
    "resolve_holdout",
    "select_modules",
]

ModuleFilter = Callable[[str, nn.Module], bool]


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


def _require_config(config: object) -> QuantConfig:
    if not isinstance(config, QuantConfig):
        raise TypeError(
            f"config must be a QuantConfig (e.g. QuantConfig(bits=4, block_size=64)), "
            f"got {type(config).__name__}"
        )
    return config


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
    config = _require_config(config)
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        raise TypeError(
            f"expected a floating-point tensor, got {getattr(tensor, 'dtype', type(tensor))}"
        )
    if config.block_shape == "2d" and tensor.dim() != 2:
        raise ValueError(f"2-D tiles need a 2-D tensor, got shape {tuple(tensor.shape)}")
    block = config.block
    held = None if holdout is None else holdout_mask(tensor.shape, holdout).to(tensor.device)
    work_dtype = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    blocks = _to_blocks(tensor.detach().to(work_dtype), block)
    valid = None
    if held is not None or blocks.numel() != tensor.numel():
        # Padding enters as zeros in ``keep`` too, so it is invalid like a held-out element.
        keep = torch.ones_like(tensor, dtype=work_dtype) if held is None else (~held).to(work_dtype)
        valid = _to_blocks(keep, block) > 0
    if config.clip is not None:
        all_valid = torch.ones_like(blocks, dtype=torch.bool) if valid is None else valid
        blocks = _clip_blocks(blocks, all_valid, config.clip)
    params = choose_qparams(blocks, config.bits, symmetric=config.symmetric, valid=valid)
    result = _from_blocks(fake_quantize(blocks, params), block, tensor.shape).to(tensor.dtype)
    return result if held is None else torch.where(held, tensor.detach(), result)


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


def resolve_holdout(
    model: nn.Module, holdout: Iterable[CoordinateLike] | None
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
    if hasattr(holdout, "super_weights"):  # a DetectionResult: its super_weights
        holdout = holdout.super_weights
    grouped: dict[str, list[tuple[int, int]]] = {}
    for coordinate in map(Coordinate.of, holdout):
        if coordinate.expert is not None:
            raise ValueError(
                f"{coordinate.as_tuple()!r} is inside a fused expert parameter, which "
                "quantize_model does not quantize (it quantizes 2-D linear weights); leave it "
                "out of the holdout"
            )
        element = WeightElement.resolve(model, coordinate)
        grouped.setdefault(element.module_name, []).append((element.row, element.col))
    return grouped


class QuantizedModel:
    """Fake-quantizes a model's linear weights and puts the originals back, bit for bit.

    Made directly, it checks everything when made and changes nothing until ``__enter__``
    (or :meth:`apply`), like the weight masks: ``with QuantizedModel(model, config): ...``.
    :func:`quantize_model` is the verb (torchao's ``quantize_``): it makes one and applies
    it at once, so a plain call quantizes; entering the handle it returns keeps the weights
    as they are (they are already quantized) and leaving restores them.

    Args:
        model: the model (its weights are changed in place while applied).
        config: how to quantize (see :class:`QuantConfig`).
        holdout: the super weights to keep in full precision: ``SuperWeight`` objects or
            ``(module, row, col)`` coordinates (a ``DetectionResult`` stands for its
            ``super_weights``), or ``None``. Coordinates in modules that are not quantized
            are checked and then need nothing more.
        modules: which modules (see :func:`select_modules`); default: every linear weight
            but the embeddings and the LM head.

    Raises:
        TypeError: ``config`` is not a :class:`QuantConfig`.
        ValueError: a module is missing or not Linear-like, or a coordinate lies outside
            its weight (before any weight is touched).

    Example:
        >>> from sw_hooks.testing import tiny_model
        >>> model = tiny_model("llama", num_layers=1)
        >>> quantized = QuantizedModel(model, QuantConfig(4, 64))
        >>> quantized.active
        False
        >>> with quantized:
        ...     quantized.active
        True
    """

    def __init__(
        self,
        model: nn.Module,
        config: QuantConfig,
        *,
        holdout: Iterable[CoordinateLike] | None = None,
        modules: str | Sequence[str] | ModuleFilter | None = None,
    ) -> None:
        self.config = _require_config(config)
        self._chosen = select_modules(model, modules)
        self._held = resolve_holdout(model, holdout)
        self.held_out = sum(len(self._held.get(name, ())) for name in self._chosen)
        self._originals: dict[str, tuple[nn.Module, torch.Tensor]] = {}

    @property
    def modules(self) -> list[str]:
        """The names of the modules this quantizes."""
        return list(self._chosen)

    @property
    def active(self) -> bool:
        """Whether the weights are quantized now (applied and not yet restored)."""
        return bool(self._originals)

    def apply(self) -> QuantizedModel:
        """Quantize every chosen weight in place, remembering the original first.

        An error midway restores every weight already changed before it propagates.
        """
        if self.active:
            raise RuntimeError("this model is already quantized; restore() it first")
        try:
            with torch.no_grad():
                for name, module in self._chosen.items():
                    self._originals[name] = (module, module.weight.detach().clone())
                    view = oriented_weight(module)
                    mask = holdout_mask(oriented_shape(module), self._held.get(name, ()))
                    view.copy_(quantize_tensor(view, self.config, holdout=mask))
        except BaseException:
            self.restore()
            raise
        return self

    def restore(self) -> None:
        """Put every original weight back (bit-exact), newest first (idempotent)."""
        with torch.no_grad():
            while self._originals:
                name = next(reversed(self._originals))
                module, original = self._originals.pop(name)
                module.weight.copy_(original)

    def __enter__(self) -> QuantizedModel:
        return self if self.active else self.apply()

    def __exit__(self, *exc_info: object) -> None:
        self.restore()


def quantize_model(
    model: nn.Module,
    config: QuantConfig,
    *,
    holdout: Iterable[CoordinateLike] | None = None,
    modules: str | Sequence[str] | ModuleFilter | None = None,
) -> QuantizedModel:
    """Fake-quantize the chosen linear weights in place now; hold the super weights out.

    Blocks run along each weight in ``[out, in]`` order (GPT-2's transposed ``Conv1D``
    included), so block boundaries and holdout coordinates mean the same on every
    architecture. Every argument and coordinate is checked before any weight is touched.

    Args:
        model, config, holdout, modules: as for :class:`QuantizedModel`. ``holdout`` is
            the super weights to keep (coordinates or ``SuperWeight`` objects), or ``None``.

    Returns:
        The applied :class:`QuantizedModel`; ``.restore()`` or leaving its ``with`` block
        undoes everything without reloading.

    Example:
        >>> from sw_hooks.testing import tiny_model
        >>> model = tiny_model("llama", num_layers=1)
        >>> sw = ("model.layers.0.mlp.down_proj", 3, 5)
        >>> with quantize_model(model, QuantConfig(4, 64, clip="zscore:6"), holdout=[sw]) as q:
        ...     len(q.modules)
        7
    """
    return QuantizedModel(model, config, holdout=holdout, modules=modules).apply()


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
    model: nn.Module, chosen: dict[str, nn.Module], holdout: Iterable[CoordinateLike] | None
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
    holdout: Iterable[CoordinateLike] | None = None,
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

    def hook_for(name: str) -> Callable[[nn.Module, tuple], tuple]:
        channels = held.get(name, [])

        def quantize_input(module: nn.Module, args: tuple) -> tuple:
            return (quantize_activation_tokens(args[0], bits, holdout_channels=channels), *args[1:])

        return quantize_input

    with HookSet() as hooks:
        for name, module in chosen.items():
            hooks.pre(module, hook_for(name))
        yield held


# --------------------------------------------------------------------------- sweeps


@dataclass(frozen=True)
class SweepRun:
    """One quantization setting's score, with or without the super weights held out.

    ``to_dict`` flattens the config beside ``"holdout"`` (the same boolean, under the key
    the report, ``sw-hooks quantize --json`` and the plots read) and ``"perplexity"``.
    """

    config: QuantConfig
    super_weights_held_out: bool
    perplexity: float

    def to_dict(self) -> dict[str, object]:
        return {
            **self.config.to_dict(),
            "holdout": self.super_weights_held_out,
            "perplexity": self.perplexity,
        }


def holdout_sweep(
    model: nn.Module,
    configs: Iterable[QuantConfig],
    super_weights: Iterable[CoordinateLike],
    measure: Callable[[], float],
    *,
    progress: Callable[[str], None] | None = None,
) -> list[SweepRun]:
    """Score the model quantized with each config, without and then with ``super_weights`` held out.

    The model is quantized in place for each run and restored bit for bit before the next
    one (and after an exception). ``measure`` scores the quantized model; the sweep is
    blind to what it measures, so callers pass perplexity on their own tokens. The configs
    and coordinates are all checked before the first run.

    Example:
        >>> from sw_hooks.testing import tiny_model
        >>> model = tiny_model("llama", num_layers=1)
        >>> sw = [("model.layers.0.mlp.down_proj", 3, 5)]
        >>> runs = holdout_sweep(model, [QuantConfig(4, 64, clip="zscore:6")], sw, lambda: 1.0)
        >>> [(r.config.block_size, r.super_weights_held_out) for r in runs]
        [(64, False), (64, True)]
    """
    configs = [_require_config(config) for config in configs]
    weights = list(super_weights)
    resolve_holdout(model, weights)
    runs = []
    for config in configs:
        for held_out in (False, True):
            with quantize_model(model, config, holdout=weights if held_out else None):
                value = measure()
            if progress:
                progress(f"{config}, super weights held out: {held_out}: {value:.2f}")
            runs.append(SweepRun(config, held_out, value))
    return runs
