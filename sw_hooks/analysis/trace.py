"""The small data pictures of a super weight need: its activation along the residual stream
and the weight matrix around it.

:func:`residual_trace` hooks every decoder layer and keeps one number per layer (the
chosen channel's ``|value|`` at the chosen token), so memory is O(layers) however long the
text. :func:`super_activation_trace` runs it with and without the super weight, which shows
the paper's point: the super activation, once written, rides the residual stream to the
last layer, and it is gone when the weight is zeroed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from sw_hooks.analysis.detect import layer_peaks_of
from sw_hooks.analysis.losses import Batch
from sw_hooks.core.access import WeightElement
from sw_hooks.core.devices import execution_device
from sw_hooks.core.hooks import HookSet
from sw_hooks.core.locate import layer_index
from sw_hooks.core.masks import ablate
from sw_hooks.core.record import recorded_module_names
from sw_hooks.core.results import SuperWeight


@dataclass(frozen=True)
class ResidualTrace:
    """``|hidden[batch, token, channel]|`` after each decoder layer.

    Attributes:
        channel: the hidden channel followed (a super weight's ``row``).
        token: the token position followed (the super activation's ``token_position``).
        layers: the decoder layers' indices, in order.
        magnitudes: the channel's magnitude after each of ``layers``.
    """

    channel: int
    token: int
    layers: tuple[int, ...]
    magnitudes: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "layers": list(self.layers), "magnitudes": list(self.magnitudes)}

    @classmethod
    def from_dict(cls, data: Any) -> ResidualTrace:
        """Build from :meth:`to_dict` output, with a clear error for anything else."""
        if not isinstance(data, Mapping) or not {"channel", "token", "layers", "magnitudes"} <= set(
            data
        ):
            raise ValueError("a residual trace needs 'channel', 'token', 'layers', 'magnitudes'")
        if len(data["layers"]) != len(data["magnitudes"]) or not data["layers"]:
            raise ValueError("a residual trace needs one magnitude per layer, and some layers")
        return cls(
            int(data["channel"]),
            int(data["token"]),
            tuple(int(x) for x in data["layers"]),
            tuple(float(x) for x in data["magnitudes"]),
        )


def decoder_layers(model: nn.Module, within: str | None = None) -> dict[int, nn.Module]:
    """``{layer index: decoder layer module}``, found from the recorded modules' names
    (down-projections and experts modules).

    The decoder layer is the module named up to the layer number
    (``model.layers.3.mlp.down_proj`` -> ``model.layers.3``), which holds for every
    architecture the locator knows. ``within`` (a recorded module's name) keeps only the
    layers of its own stack, so an encoder-decoder's encoder layer 1 is not confused with
    its decoder layer 1.

    Example:
        >>> from sw_hooks.testing import tiny_model
        >>> sorted(decoder_layers(tiny_model("llama", num_layers=2)))
        [0, 1]
    """
    stack = _stack_of(within) if within is not None else None
    layers = {}
    for name in recorded_module_names(model):
        index = layer_index(name)
        if index is None or (stack is not None and _stack_of(name) != stack):
            continue
        layers[index] = model.get_submodule(_layer_name(name, index))
    if not layers:
        raise ValueError("found no numbered decoder layers above the down-projections")
    return dict(sorted(layers.items()))


def _layer_name(name: str, index: int) -> str:
    parts = name.split(".")
    return ".".join(parts[: parts.index(str(index)) + 1])


def _stack_of(name: str) -> str | None:
    """The list of layers a module sits in (``encoder.block`` for
    ``encoder.block.1.layer.1.DenseReluDense.wo``)."""
    index = layer_index(name)
    return _layer_name(name, index).rsplit(".", 1)[0] if index is not None else None


def _hidden(output: Any) -> torch.Tensor:
    # Decoder layers return a tensor or a tuple whose first item is the hidden state.
    return output[0] if isinstance(output, tuple | list) else output


def _run(model: nn.Module, inputs: Batch) -> None:
    device = execution_device(model)
    if isinstance(inputs, torch.Tensor):
        model(inputs.to(device))
    else:
        model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()})


@torch.no_grad()
def residual_trace(
    model: nn.Module,
    ids: Batch,
    channel: int,
    token: int,
    *,
    batch: int = 0,
    within: str | None = None,
) -> ResidualTrace:
    """Follow one residual channel at one token through every decoder layer.

    Args:
        model: a model whose down-projections the locator finds.
        ids: token ids ``[batch, tokens]``, or a dict of model inputs (``pixel_values``,
            ``input_features``, ...).
        channel: hidden channel to follow; token: its position; batch: which sequence.
        within: follow the layers of this module's stack only (an encoder-decoder's
            encoder or decoder; default: every numbered layer).

    Raises:
        ValueError: ``token`` or ``channel`` lies outside the hidden states.

    Example:
        >>> from sw_hooks.testing import planted_llama
        >>> planted = planted_llama()
        >>> trace = residual_trace(planted.model, planted.prompt(), channel=5, token=0)
        >>> trace.layers
        (0, 1, 2, 3)
    """
    layers = decoder_layers(model, within)
    if isinstance(ids, torch.Tensor) and (
        ids.dim() != 2 or not 0 <= token < ids.shape[1] or not 0 <= batch < ids.shape[0]
    ):
        raise ValueError(
            f"token {token} / batch {batch} is outside ids of shape {tuple(ids.shape)}"
        )
    magnitudes: dict[int, float] = {}

    def keep(index: int) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            hidden = _hidden(output)
            if not 0 <= channel < hidden.shape[-1]:
                raise ValueError(f"channel {channel} is outside hidden size {hidden.shape[-1]}")
            if hidden.dim() != 3 or not (0 <= token < hidden.shape[1] and batch < len(hidden)):
                raise ValueError(
                    f"token {token} / batch {batch} is outside the hidden states of shape "
                    f"{tuple(hidden.shape)}"
                )
            magnitudes[index] = float(hidden[batch, token, channel].abs())

        return hook

    with HookSet() as hooks:
        for index, layer in layers.items():
            hooks.forward(layer, keep(index))
        _run(model, ids)
    return ResidualTrace(channel, token, tuple(layers), tuple(magnitudes[i] for i in layers))


def super_activation_trace(
    model: nn.Module, ids: Batch, super_weight: SuperWeight
) -> tuple[ResidualTrace, ResidualTrace]:
    """The super activation's channel along the residual stream: ``(original, ablated)``.

    Follows channel ``super_weight.row`` at ``super_weight.token_position`` through the
    layers of the weight's own stack, once as is and once with the weight zeroed
    (restored on return).

    Example:
        >>> from sw_hooks.testing import planted_llama
        >>> planted = planted_llama()
        >>> sw = SuperWeight("model.layers.1.mlp.down_proj", 1, 5, 17, 8.0)
        >>> original, ablated = super_activation_trace(planted.model, planted.prompt(), sw)
        >>> original.magnitudes[-1] > 10 * ablated.magnitudes[-1]
        True
    """
    row, token, module = super_weight.row, super_weight.token_position, super_weight.module
    original = residual_trace(model, ids, row, token, within=module)
    with ablate(model, [super_weight]):
        ablated = residual_trace(model, ids, row, token, within=module)
    return original, ablated


@dataclass(frozen=True)
class WeightPatch:
    """A window of a down-projection's weight (``[out, in]`` order) around a super weight.

    Attributes:
        module: the down-projection's name.
        row, col: the super weight's coordinate in the full matrix.
        first_row, first_col: the window's top-left coordinate in the full matrix.
        values: the window, ``values[i][j] = weight[first_row + i, first_col + j]``.
    """

    module: str
    row: int
    col: int
    first_row: int
    first_col: int
    values: tuple[tuple[float, ...], ...]

    @property
    def centre(self) -> float:
        """The super weight's own value."""
        return self.values[self.row - self.first_row][self.col - self.first_col]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "values": [list(r) for r in self.values]}

    @classmethod
    def from_dict(cls, data: Any) -> WeightPatch:
        """Build from :meth:`to_dict` output, with a clear error for anything else."""
        keys = {"module", "row", "col", "first_row", "first_col", "values"}
        if not isinstance(data, Mapping) or not keys <= set(data):
            raise ValueError(f"a weight patch needs the keys {sorted(keys)}")
        values = tuple(tuple(float(v) for v in r) for r in data["values"])
        if not values or len({len(r) for r in values}) != 1:
            raise ValueError("a weight patch's values must be a non-empty rectangle")
        patch = cls(
            str(data["module"]),
            int(data["row"]),
            int(data["col"]),
            int(data["first_row"]),
            int(data["first_col"]),
            values,
        )
        if not (0 <= patch.row - patch.first_row < len(values)) or not (
            0 <= patch.col - patch.first_col < len(values[0])
        ):
            raise ValueError("a weight patch must contain its own (row, col)")
        return patch


def weight_patch(model: nn.Module, super_weight: SuperWeight, radius: int = 8) -> WeightPatch:
    """The ``(2 * radius + 1)``-square window of the weight around a super weight.

    The window is clamped to the matrix edges, so it may be smaller there.

    Example:
        >>> from sw_hooks.testing import planted_llama
        >>> sw = SuperWeight("model.layers.1.mlp.down_proj", 1, 5, 17, 8.0)
        >>> weight_patch(planted_llama().model, sw, radius=2).centre
        8.0
    """
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    weight = WeightElement.resolve(model, super_weight.coordinate).matrix().detach()
    rows, cols = weight.shape
    if not (super_weight.row < rows and super_weight.col < cols):
        raise ValueError(
            f"[{super_weight.row}, {super_weight.col}] is outside {super_weight.module} "
            f"of shape {tuple(weight.shape)}"
        )
    top, left = max(super_weight.row - radius, 0), max(super_weight.col - radius, 0)
    window = weight[top : super_weight.row + radius + 1, left : super_weight.col + radius + 1]
    values = tuple(tuple(r) for r in window.float().cpu().tolist())
    return WeightPatch(super_weight.module, super_weight.row, super_weight.col, top, left, values)


def layer_peaks(stats: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per down-projection: max ``|input|`` and ``|output|`` and the channel of each.

    ``stats`` is :attr:`sw_hooks.core.record.Recorder.stats`. The rows are plain JSON, in layer
    order, and are what :func:`sw_hooks.outputs.plots.activation_spikes` draws.

    Example:
        >>> from sw_hooks.core.record import record
        >>> from sw_hooks.testing import planted_llama
        >>> planted = planted_llama()
        >>> with record(planted.model) as rec, torch.no_grad():
        ...     _ = planted.model(planted.prompt())
        >>> [row["output_channel"] for row in layer_peaks(rec.stats)][1]
        5
    """
    return [asdict(peak) for peak in layer_peaks_of(stats)]
