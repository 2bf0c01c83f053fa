"""Figures of where super weights act: the paper's Figure 2, spike profiles, residual stream, weights.

Example:
    >>> from sw_hooks.outputs.spike_plots import activation_spikes  # doctest: +SKIP
    >>> fig = activation_spikes(result.layer_peaks, result)  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from sw_hooks.analysis.trace import ResidualTrace, WeightPatch
from sw_hooks.core.results import LayerPeak, SuperWeight
from sw_hooks.outputs.figure_base import (
    OTHER_COLOUR,
    SUPER_COLOUR,
    Mark,
    as_super_weights,
    draw_mark,
    integer_layers,
    loaded,
    loaded_all,
    new_figure,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from sw_hooks.core.record import ChannelStats


# --------------------------------------------------------------------------- Figure 2


def activation_spikes(
    peaks: Iterable[LayerPeak | Mapping[str, Any]] | Mapping[str, ChannelStats],
    super_weights: Any = (),
) -> Figure:
    """Max ``|input|`` and ``|output|`` of the down-projection per layer, log scale (Figure 2).

    Args:
        peaks: :attr:`DetectionResult.layer_peaks` (or their JSON), or the recorder's
            stats to compute them from.
        super_weights: a :class:`DetectionResult`, its JSON, or super weights; verified
            ones are marked in red with their channel, other candidates in grey.

    Example:
        >>> fig = activation_spikes(result.layer_peaks, result)  # doctest: +SKIP
    """
    weights = as_super_weights(super_weights)
    if isinstance(peaks, Mapping):
        from sw_hooks.analysis.detect import layer_peaks_of

        peaks = layer_peaks_of(peaks)
    rows = loaded_all(peaks, LayerPeak, "layer peaks")
    layers = [r.layer if r.layer is not None else i for i, r in enumerate(rows)]
    figure, (left, right) = new_figure(10, 3.8, columns=2)
    for axes, side, channel_of in ((left, "input", "col"), (right, "output", "row")):
        values = [getattr(r, f"{side}_max") for r in rows]
        axes.plot(layers, values, "o-", color="#1f77b4", markersize=4)
        axes.set_yscale("log")
        axes.set_xlabel("layer")
        axes.set_ylabel(f"max |{side}|")
        axes.set_title(f"down-projection {side}")
        integer_layers(axes)
        axes.grid(True, which="major", alpha=0.3)
        by_layer = dict(zip(layers, values, strict=True))
        for weight in weights:
            if weight.layer not in by_layer:
                continue
            channel = getattr(weight, channel_of)
            is_super = weight.verdict == "super"
            mark = Mark(
                side, weight.verdict, weight.layer, channel, weight.layer, by_layer[weight.layer]
            )
            colour = SUPER_COLOUR if is_super else OTHER_COLOUR
            draw_mark(figure, axes, mark, colour=colour, filled=is_super)
            if is_super:  # candidates stay unlabelled: a late layer can hold several
                axes.annotate(
                    f"layer {weight.layer}\n{channel_of} {channel}",
                    (mark.x, mark.y),
                    xytext=(8, -4),
                    textcoords="offset points",
                    fontsize=8,
                    color=colour,
                )
    return figure


# --------------------------------------------------------------------------- residual stream


def residual_stream(
    original: ResidualTrace | Mapping[str, Any],
    ablated: ResidualTrace | Mapping[str, Any] | None = None,
    super_weight: SuperWeight | Mapping[str, Any] | None = None,
) -> Figure:
    """The super activation's channel after every layer, with and without the super weight.

    Args:
        original: :func:`sw_hooks.analysis.trace.super_activation_trace`'s first trace (or JSON).
        ablated: its second trace, drawn dashed; ``None`` to draw one line.
        super_weight: marks the layer that writes the super activation.

    Example:
        >>> fig = residual_stream(*super_activation_trace(model, ids, sw), sw)  # doctest: +SKIP
    """
    shown = (original,) if ablated is None else (original, ablated)
    traces = [loaded(trace, ResidualTrace) for trace in shown]
    figure, (axes,) = new_figure(6.5, 3.8)
    for trace, label, style in zip(
        traces, ("original", "super weight zeroed"), ("o-", "s--"), strict=False
    ):
        axes.plot(
            trace.layers, [max(m, 1e-6) for m in trace.magnitudes], style, markersize=4, label=label
        )
    first = traces[0]
    axes.set_yscale("log")
    axes.set_xlabel("after layer")
    axes.set_ylabel(f"|hidden[token {first.token}, channel {first.channel}]|")
    axes.set_title("super activation along the residual stream")
    integer_layers(axes)
    axes.grid(True, which="major", alpha=0.3)
    if super_weight is not None:
        weight = loaded(super_weight, SuperWeight)
        if weight.layer in first.layers:
            y = max(first.magnitudes[first.layers.index(weight.layer)], 1e-6)
            mark = Mark(
                "residual",
                "written by the super weight",
                weight.layer,
                first.channel,
                weight.layer,
                y,
            )
            draw_mark(figure, axes, mark, colour=SUPER_COLOUR)
            axes.annotate(
                f"layer {weight.layer} [{weight.row}, {weight.col}]",
                (mark.x, mark.y),
                xytext=(10, -14),
                textcoords="offset points",
                fontsize=8,
                color=SUPER_COLOUR,
            )
    axes.legend(fontsize=8)
    return figure


# --------------------------------------------------------------------------- weight heat map


def weight_heatmaps(patches: Iterable[WeightPatch | Mapping[str, Any]]) -> Figure:
    """``|w|`` around each super weight on a log colour scale, the super weight boxed.

    Args:
        patches: :func:`sw_hooks.analysis.trace.weight_patch` windows (or their JSON), one panel each.

    Example:
        >>> fig = weight_heatmaps([weight_patch(model, sw) for sw in result.verified])  # doctest: +SKIP
    """
    import numpy as np
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Rectangle

    windows = loaded_all(patches, WeightPatch, "weight patches")
    figure, panels = new_figure(4.2 * len(windows), 4.0, columns=len(windows))
    for axes, patch in zip(panels, windows, strict=True):
        magnitudes = np.abs(np.asarray(patch.values, dtype=float))
        positive = magnitudes[magnitudes > 0]
        top = float(magnitudes.max()) if magnitudes.max() > 0 else 1.0
        # Zeros have no logarithm: they take the floor colour.
        floor = max(float(positive.min()) if positive.size else top, top * 1e-4)
        rows, cols = magnitudes.shape
        extent = (
            patch.first_col - 0.5,
            patch.first_col + cols - 0.5,
            patch.first_row + rows - 0.5,
            patch.first_row - 0.5,
        )
        image = axes.imshow(
            magnitudes.clip(min=floor),
            norm=LogNorm(vmin=floor, vmax=top),
            cmap="viridis",
            extent=extent,
        )
        figure.colorbar(image, ax=axes, shrink=0.8, label="|w|")
        axes.add_patch(
            Rectangle(
                (patch.col - 0.5, patch.row - 0.5),
                1,
                1,
                fill=False,
                edgecolor=SUPER_COLOUR,
                linewidth=2,
            )
        )
        others = np.delete(
            magnitudes.ravel(), (patch.row - patch.first_row) * cols + patch.col - patch.first_col
        )
        typical = float(np.median(others)) if others.size else 0.0
        ratio = (
            f"\n{abs(patch.centre) / typical:.0f}x the window's median |w|" if typical > 0 else ""
        )
        axes.set_title(
            f"layer {_layer_of(patch.module)} [{patch.row}, {patch.col}] = {patch.centre:.3g}{ratio}",
            fontsize=9,
        )
        axes.set_xlabel("input channel (col)")
        axes.set_ylabel("output channel (row)")
        figure._sw_marks.append(  # type: ignore[attr-defined]
            Mark("weight", patch.module, _layer_of(patch.module), patch.row, patch.col, patch.row)
        )
    return figure


def _layer_of(module: str) -> int | None:
    from sw_hooks.core.locate import layer_index

    return layer_index(module)


# --------------------------------------------------------------------------- original vs candidate


def spike_profiles(
    original: Iterable[LayerPeak | Mapping[str, Any]],
    candidate: Iterable[LayerPeak | Mapping[str, Any]],
    names: tuple[str, str] = ("original", "candidate"),
) -> Figure:
    """Per-layer peak ``|output|`` of the down-projection in two models, log scale.

    The layer where the candidate's peak differs most from the original's (by ratio) is
    marked, so a quantized or fine-tuned copy that lost a super activation shows at once.

    Args:
        original, candidate: :class:`LayerPeak` rows (or their JSON) of the same layers,
            e.g. :attr:`sw_hooks.analysis.model_comparison.ModelComparison.layers`' two sides.
        names: the two models' labels.

    Example:
        >>> pairs = comparison.layers  # doctest: +SKIP
        >>> fig = spike_profiles([p.original for p in pairs], [p.candidate for p in pairs])  # doctest: +SKIP
    """
    before = loaded_all(original, LayerPeak, "original layer peaks")
    after = loaded_all(candidate, LayerPeak, "candidate layer peaks")
    if [p.module for p in before] != [p.module for p in after]:
        raise ValueError("the two spike profiles must cover the same down-projections")
    layers = [p.layer if p.layer is not None else i for i, p in enumerate(before)]
    figure, (axes,) = new_figure(6.5, 3.8)
    floor = 1e-6  # a zero peak has no logarithm
    for peaks, name, style in ((before, names[0], "o-"), (after, names[1], "s--")):
        values = [max(p.output_max, floor) for p in peaks]
        axes.plot(layers, values, style, markersize=4, label=name)
    changes = [
        abs(_log_ratio(b.output_max, a.output_max, floor))
        for b, a in zip(before, after, strict=True)
    ]
    worst = max(range(len(changes)), key=changes.__getitem__)
    mark = Mark(
        "output",
        "largest change",
        layers[worst],
        before[worst].output_channel,
        layers[worst],
        max(after[worst].output_max, floor),
    )
    draw_mark(figure, axes, mark, colour=SUPER_COLOUR, filled=False)
    axes.set_yscale("log")
    axes.set_xlabel("layer")
    axes.set_ylabel("max |output| of the down-projection")
    axes.set_title("spike profiles")
    integer_layers(axes)
    axes.grid(True, which="major", alpha=0.3)
    axes.legend(fontsize=8)
    return figure


def _log_ratio(original: float, candidate: float, floor: float) -> float:
    return math.log(max(candidate, floor) / max(original, floor))
