"""From recorded maxima to candidates: spiking units, spike pairs, per-layer peaks.

Pure functions of the recorder's ``{Unit: ChannelStats}`` (dense down-projections and
experts alike), apart from reading the candidate weights' values.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import torch
from torch import nn

from sw_hooks.analysis.options import DetectionOptions, resolve_options
from sw_hooks.core.access import Coordinate, WeightElement
from sw_hooks.core.locate import layer_index
from sw_hooks.core.maxima import ChannelMaxima, ChannelStats
from sw_hooks.core.results import LayerPeak, SuperWeight
from sw_hooks.core.units import Unit

K = TypeVar("K", str, Unit)


def _layer_peaks(stats: Mapping[K, ChannelStats]) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = torch.stack([s.input.abs_max.max() for s in stats.values()])
    outputs = torch.stack([s.output.abs_max.max() for s in stats.values()])
    return inputs, outputs


def spiking_layers(stats: Mapping[K, ChannelStats], spike_factor: float) -> list[K]:
    """Units (or modules) whose max ``|input|`` and ``|output|`` both stand ``spike_factor`` above the rest.

    The reference is the *lower* median over layers, so spikes in up to half of the
    layers cannot raise their own bar.
    """
    usable = {n: s for n, s in stats.items() if s.input is not None and s.output is not None}
    if len(usable) < 2:
        return []
    inputs, outputs = _layer_peaks(usable)
    spiking = (inputs >= spike_factor * inputs.median()) & (
        outputs >= spike_factor * outputs.median()
    )
    return [name for name, hit in zip(usable, spiking.tolist(), strict=True) if hit]


def check_finite(stats: Mapping[str, ChannelStats] | Mapping[Unit, ChannelStats]) -> None:
    """Refuse stats holding a NaN or infinite activation, naming where it first appeared.

    The recorder keeps non-finite maxima (a NaN is never overwritten), so a model that
    overflowed anywhere in the calibration pass cannot yield a spike ranking.
    """
    for name, module_stats in stats.items():
        for side in ("input", "output"):
            maxima: ChannelMaxima | None = getattr(module_stats, side)
            if maxima is None or bool(maxima.abs_max.isfinite().all()):
                continue
            channel = int((~maxima.abs_max.isfinite()).nonzero()[0, 0])
            raise ValueError(
                f"non-finite activation ({float(maxima.value[channel])}) in the {side} of "
                f"{name}, channel {channel}, token {int(maxima.token[channel])}: the model "
                "overflowed or holds NaN/inf weights; detection needs finite activations"
            )


def _spike_channels(maxima: ChannelMaxima, ratio: float, limit: int) -> list[int]:
    peak = maxima.abs_max.max()
    count = min(limit, int((maxima.abs_max >= ratio * peak).sum()))
    return maxima.abs_max.topk(count).indices.tolist()


def spike_candidates(
    model: nn.Module,
    stats: Mapping[str, ChannelStats] | Mapping[Unit, ChannelStats],
    options: DetectionOptions | None = None,
    **overrides: Any,
) -> list[SuperWeight]:
    """Turn recorder stats into candidate super weights (unverified).

    Pure apart from reading the candidate weights' values. Each candidate is a spike pair
    (output channel ``row``, input channel ``col``) in a spiking unit whose weight can
    explain the output spike. ``stats`` is :attr:`Recorder.units <sw_hooks.core.record.Recorder.units>`
    (dense down-projections and experts alike: every routed expert is one unit of the
    population whose median sets the spike bar) or a dense ``{module: ChannelStats}``.

    Example:
        >>> from sw_hooks.testing import planted_llama
        >>> planted = planted_llama(num_layers=6)
        >>> with record(planted.model) as rec, torch.no_grad():
        ...     _ = planted.model(planted.prompt())
        >>> [(w.layer, w.row, w.col) for w in spike_candidates(planted.model, rec.stats)]
        [(1, 5, 17), (5, 9, 33)]
    """
    options = resolve_options(options, overrides)
    units = {Unit.of(key): value for key, value in stats.items()}
    check_finite(units)
    found = []
    for unit in spiking_layers(units, options.spike_factor):
        found += _unit_candidates(model, unit, units[unit], options)
    return found


def _unit_candidates(
    model: nn.Module, unit: Unit, stats: ChannelStats, options: DetectionOptions
) -> list[SuperWeight]:
    inputs, outputs = stats.input, stats.output
    candidates = []
    for row in _spike_channels(outputs, options.channel_ratio, options.max_channels):
        for col in _spike_channels(inputs, options.channel_ratio, options.max_channels):
            coordinate = Coordinate(unit.module, row, col, unit.expert)
            value = WeightElement.resolve(model, coordinate).read_float()
            explained = abs(value) * float(inputs.abs_max[col])
            if explained >= options.min_contribution * float(outputs.abs_max[row]):
                candidates.append(
                    SuperWeight(
                        module=unit.module,
                        layer=layer_index(unit.module),
                        row=row,
                        col=col,
                        value=value,
                        input_activation=float(inputs.value[col]),
                        output_activation=float(outputs.value[row]),
                        # A list-layout expert sees its tokens gathered: position unknown.
                        token_position=max(int(outputs.token[row]), 0),
                        expert=unit.expert,
                    )
                )
    return candidates


def layer_peaks_of(
    stats: Mapping[str, ChannelStats] | Mapping[Unit, ChannelStats],
) -> tuple[LayerPeak, ...]:
    """Per recorded module with both sides: its largest ``|input|`` and ``|output|`` and channels.

    Units of one experts module give one peak: the expert with the largest ``|output|``.

    Example:
        >>> from sw_hooks.testing import planted_llama
        >>> planted = planted_llama()
        >>> with record(planted.model) as rec, torch.no_grad():
        ...     _ = planted.model(planted.prompt())
        >>> peak = layer_peaks_of(rec.stats)[1]
        >>> (peak.layer, peak.output_channel, peak.input_channel)
        (1, 5, 17)
    """
    peaks: dict[str, LayerPeak] = {}
    for key, unit_stats in stats.items():
        if unit_stats.input is None or unit_stats.output is None:
            continue
        name = Unit.of(key).module
        input_channel, input_max = unit_stats.input.top()
        output_channel, output_max = unit_stats.output.top()
        if name not in peaks or output_max > peaks[name].output_max:
            peaks[name] = LayerPeak(
                name, layer_index(name), input_max, input_channel, output_max, output_channel
            )
    return tuple(peaks.values())
