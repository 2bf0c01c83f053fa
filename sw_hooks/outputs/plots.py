"""Figures of super weights, drawn from the library's own result objects (or their JSON).

Every function returns a matplotlib :class:`~matplotlib.figure.Figure` built without
``pyplot`` (no global state, no display: the ``Agg`` canvas), and records what it
highlighted as :class:`Mark` objects that :func:`marks` reads back, so a test can check
*which* layer and channel a figure points at from the data it drew, not from pixels.

matplotlib is imported only when a figure is made: ``pip install "sw_hooks[plots]"``.

Example:
    >>> from sw_hooks.outputs.plots import impact_bars, save_figure  # doctest: +SKIP
    >>> save_figure(impact_bars(rows), "impact.png")  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sw_hooks.analysis.impact import ImpactRow
from sw_hooks.analysis.trace import ResidualTrace, WeightPatch
from sw_hooks.core.results import DetectionResult, LayerPeak, SuperWeight
from sw_hooks.quant.config import QuantConfig
from sw_hooks.quant.quantize import SweepRun

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from sw_hooks.core.record import ChannelStats

_Result = TypeVar("_Result")

DPI = 100
SUPER_COLOUR = "#d62728"
OTHER_COLOUR = "#7f7f7f"


@dataclass(frozen=True)
class Mark:
    """One highlighted point of a figure and the super weight (or condition) it stands for.

    Attributes:
        panel: which panel of the figure (``"input"``, ``"output"``, ``"perplexity"`` ...).
        label: what is marked (a verdict, a condition, a weight tag).
        layer: the layer marked, if any.
        channel: the channel marked (input column or output row), if any.
        x, y: where the mark is drawn, in data coordinates.
    """

    panel: str
    label: str
    layer: int | None
    channel: int | None
    x: float
    y: float


def marks(figure: Figure) -> tuple[Mark, ...]:
    """What a figure of this module highlighted, in drawing order.

    Example:
        >>> [m.channel for m in marks(fig) if m.panel == "output"]  # doctest: +SKIP
        [5]
    """
    return tuple(getattr(figure, "_sw_marks", ()))


def save_figure(figure: Figure, path: str | Path, *, dpi: int = DPI) -> Path:
    """Write ``figure`` as a PNG (or whatever the suffix names) and return the path."""
    path = Path(path)
    figure.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


# --------------------------------------------------------------------------- plumbing


def _new_figure(width: float, height: float, columns: int = 1) -> tuple[Figure, list[Axes]]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError('plots need matplotlib: pip install "sw_hooks[plots]"') from None
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)  # headless: the canvas renders to a buffer, never a window
    axes = figure.subplots(1, columns, squeeze=False)[0]
    figure._sw_marks = []  # type: ignore[attr-defined]
    return figure, list(axes)


def _integer_layers(axes: Axes) -> None:
    from matplotlib.ticker import MaxNLocator

    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.margins(x=0.08)


def _mark(figure: Figure, axes: Axes, mark: Mark, *, colour: str, filled: bool = True) -> None:
    axes.scatter(
        [mark.x],
        [mark.y],
        s=90,
        zorder=5,
        facecolors=colour if filled else "none",
        edgecolors=colour,
        linewidths=1.8,
    )
    figure._sw_marks.append(mark)  # type: ignore[attr-defined]


def _loaded(item: Any, kind: type[_Result]) -> _Result:
    """``item`` as a ``kind`` result object: objects pass through, JSON objects are read.

    The one place the figures turn JSON (a report's ``report.json``, ``sw-hooks quantize
    --json``) into the library's result objects; every figure draws from objects only.
    """
    if isinstance(item, kind):
        return item
    if not isinstance(item, Mapping):
        raise ValueError(
            f"expected a {kind.__name__} or its JSON object, got {type(item).__name__}"
        )
    readers = {ImpactRow: _impact_row, SweepRun: _sweep_run}
    read = readers.get(kind, getattr(kind, "from_dict", None))
    return read(dict(item))


def _loaded_all(items: Iterable[Any], kind: type[_Result], what: str) -> list[_Result]:
    """Every item as a ``kind``; nothing to draw is an error."""
    loaded_items = [_loaded(item, kind) for item in items]
    if not loaded_items:
        raise ValueError(f"no {what} to plot")
    return loaded_items


def _impact_row(data: dict[str, Any]) -> ImpactRow:
    names = [f.name for f in fields(ImpactRow)]
    missing = sorted(set(names) - set(data))
    if missing:
        raise ValueError(f"impact rows lack {missing}; got keys {sorted(data)}")
    return ImpactRow(**{name: data[name] for name in names})


def _sweep_run(data: dict[str, Any]) -> SweepRun:
    """A run from :meth:`SweepRun.to_dict`: the config's fields beside ``holdout``."""
    missing = sorted({"bits", "block_size", "clip", "holdout", "perplexity"} - set(data))
    if missing:
        raise ValueError(f"quantization rows lack {missing}; got keys {sorted(data)}")
    size = data["block_size"]
    config = QuantConfig(
        data["bits"],
        tuple(size) if isinstance(size, list) else size,
        block_shape=data.get("block_shape", "1d"),
        symmetric=data.get("symmetric", False),
        clip=data["clip"],
    )
    return SweepRun(config, bool(data["holdout"]), float(data["perplexity"]))


def _as_super_weights(weights: Any) -> list[SuperWeight]:
    """Super weights from a result, its JSON, or a list of either kind of weight."""
    if isinstance(weights, DetectionResult | Mapping):
        return list(_loaded(weights, DetectionResult).super_weights)
    if isinstance(weights, Iterable) and not isinstance(weights, str | bytes):
        return [_loaded(w, SuperWeight) for w in weights]
    raise ValueError(
        f"expected super weights, a DetectionResult or its JSON, got {type(weights).__name__}"
    )


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
    weights = _as_super_weights(super_weights)
    if isinstance(peaks, Mapping):
        from sw_hooks.analysis.detect import layer_peaks_of

        peaks = layer_peaks_of(peaks)
    rows = _loaded_all(peaks, LayerPeak, "layer peaks")
    layers = [r.layer if r.layer is not None else i for i, r in enumerate(rows)]
    figure, (left, right) = _new_figure(10, 3.8, columns=2)
    for axes, side, channel_of in ((left, "input", "col"), (right, "output", "row")):
        values = [getattr(r, f"{side}_max") for r in rows]
        axes.plot(layers, values, "o-", color="#1f77b4", markersize=4)
        axes.set_yscale("log")
        axes.set_xlabel("layer")
        axes.set_ylabel(f"max |{side}|")
        axes.set_title(f"down-projection {side}")
        _integer_layers(axes)
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
            _mark(figure, axes, mark, colour=colour, filled=is_super)
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
    traces = [_loaded(trace, ResidualTrace) for trace in shown]
    figure, (axes,) = _new_figure(6.5, 3.8)
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
    _integer_layers(axes)
    axes.grid(True, which="major", alpha=0.3)
    if super_weight is not None:
        weight = _loaded(super_weight, SuperWeight)
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
            _mark(figure, axes, mark, colour=SUPER_COLOUR)
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

    windows = _loaded_all(patches, WeightPatch, "weight patches")
    figure, panels = _new_figure(4.2 * len(windows), 4.0, columns=len(windows))
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


# --------------------------------------------------------------------------- impact


SHORT_CONDITIONS = {
    "original": "original",
    "super weights pruned": "super weights\npruned",
    "non-super outliers pruned": "non-super outliers\npruned",
    "super weights pruned, super activation restored": "pruned, super\nactivation restored",
}


def impact_bars(rows: Iterable[ImpactRow | Mapping[str, Any]]) -> Figure:
    """Perplexity and next-token stopword probability for each of Table 1's conditions.

    Args:
        rows: :func:`sw_hooks.analysis.impact.table1` rows (or their JSON).

    Example:
        >>> fig = impact_bars(table1(model, ids, result.verified))  # doctest: +SKIP
    """
    table = _loaded_all(rows, ImpactRow, "impact rows")
    names = [SHORT_CONDITIONS.get(r.condition, r.condition) for r in table]
    pruned = "super weights pruned"
    colours = [SUPER_COLOUR if r.condition == pruned else "#1f77b4" for r in table]
    figure, (left, right) = _new_figure(10, 3.8, columns=2)
    perplexities = [float(r.perplexity) for r in table]
    left.bar(range(len(table)), perplexities, color=colours)
    left.set_yscale("log")
    left.set_ylabel("perplexity")
    left.set_title("perplexity")
    stopword = [float(r.stopword_mass or 0.0) for r in table]
    right.bar(range(len(table)), stopword, color=colours)
    right.set_ylabel("mean next-token probability")
    right.set_title("probability on stopwords")
    for axes, values, fmt in ((left, perplexities, "{:.1f}"), (right, stopword, "{:.3f}")):
        axes.set_xticks(range(len(table)), names, fontsize=8)
        for i, value in enumerate(values):
            axes.annotate(fmt.format(value), (i, value), ha="center", va="bottom", fontsize=8)
    for i, row in enumerate(table):
        if row.condition == pruned:
            figure._sw_marks += [  # type: ignore[attr-defined]
                Mark("perplexity", row.condition, None, None, i, perplexities[i]),
                Mark("stopwords", row.condition, None, None, i, stopword[i]),
            ]
    return figure


# --------------------------------------------------------------------------- quantization


def quantization_sweep(
    runs: Iterable[SweepRun | Mapping[str, Any]] | Mapping[str, Any], baseline: float | None = None
) -> Figure:
    """Perplexity against block size, with and without the super weights held out.

    Args:
        runs: :func:`sw_hooks.quant.quantize.holdout_sweep` runs, or a JSON object with ``runs``
            and ``baseline_perplexity`` (what ``sw-hooks quantize --json`` writes).
        baseline: the unquantized perplexity, drawn as a dotted line.

    Example:
        >>> fig = quantization_sweep(holdout_sweep(model, configs, sws, measure), base)  # doctest: +SKIP
    """
    if isinstance(runs, Mapping):
        baseline = runs.get("baseline_perplexity", baseline)
        runs = runs.get("runs", ())
    table = _loaded_all(runs, SweepRun, "quantization runs")
    figure, (axes,) = _new_figure(6.5, 3.8)
    series: dict[tuple[int, str, bool], list[tuple[int, float]]] = {}
    for run in table:
        key = (run.config.bits, str(run.config.clip or "none"), run.super_weights_held_out)
        series.setdefault(key, []).append((_block_elements(run.config), run.perplexity))
    for (bits, clip, held), points in sorted(series.items()):
        points.sort()
        axes.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            "o-" if held else "s--",
            color=SUPER_COLOUR if held else OTHER_COLOUR,
            label=f"{bits}-bit, clip {clip}, {'super weights held out' if held else 'no holdout'}",
        )
    if baseline is not None:
        axes.axhline(
            float(baseline), linestyle=":", color="black", label=f"unquantized {baseline:.2f}"
        )
    axes.set_xscale("log", base=2)
    sizes = sorted({_block_elements(run.config) for run in table})
    axes.set_xticks(sizes, [str(size) for size in sizes])
    axes.minorticks_off()
    axes.set_yscale("log")
    axes.set_xlabel("block size (weights per block)")
    axes.set_ylabel("perplexity")
    axes.set_title("round-to-nearest quantization")
    axes.grid(True, which="major", alpha=0.3)
    axes.legend(fontsize=7)
    return figure


def _block_elements(config: QuantConfig) -> int:
    """Weights per block: the 1-D block size, or rows x cols of a 2-D tile."""
    return math.prod(config.block)


# --------------------------------------------------------------------------- monitoring


_WEIGHT_KEY = re.compile(
    r"^(?P<stage>(?:[^/]+/)?[^/]+)/(?P<tag>[^/]*?(?:layer_(?P<layer>\d+))?[^/]*\.row_(?P<row>\d+)"
    r"\.col_(?P<col>\d+))/(?P<kind>value|activation)$"
)


def read_history(path: str | Path) -> list[dict[str, float]]:
    """A Lightning ``CSVLogger``'s ``metrics.csv`` as rows of ``{name: number}`` (blanks dropped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such metrics file: {path}")
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        return [
            {k: float(v) for k, v in row.items() if k and v not in (None, "")} for row in reader
        ]


def monitoring_history(history: str | Path | Iterable[Mapping[str, float]]) -> Figure:
    """Super activation and super-weight value over training steps, one line per weight.

    Args:
        history: the logged rows of :class:`sw_hooks.training.lightning.SuperWeightMonitor` (each a
            ``{name: value}`` dict with a ``step``), or the path of a ``CSVLogger``'s
            ``metrics.csv``. Names follow :func:`sw_hooks.training.monitor.metric_values`:
            ``sw/train/layer_1.row_5.col_17/activation`` and ``.../value``.

    Example:
        >>> fig = monitoring_history("lightning_logs/version_0/metrics.csv")  # doctest: +SKIP
    """
    rows = read_history(history) if isinstance(history, str | Path) else [dict(r) for r in history]
    lines: dict[tuple[str, str, str], list[tuple[float, float]]] = {}
    found: dict[str, re.Match[str]] = {}
    for row in rows:
        if "step" not in row:
            continue
        for name, value in row.items():
            match = _WEIGHT_KEY.match(name)
            if match and value is not None and not math.isnan(float(value)):
                key = (match["kind"], match["stage"], match["tag"])
                lines.setdefault(key, []).append((float(row["step"]), float(value)))
                found[f"{match['stage']}/{match['tag']}"] = match
    if not lines:
        raise ValueError(
            "no super-weight values in the history: expected names like "
            "'sw/train/layer_1.row_5.col_17/activation' beside a 'step' column"
        )
    figure, (left, right) = _new_figure(10, 3.8, columns=2)
    for axes, kind, title in (
        (left, "activation", "super activation"),
        (right, "value", "super-weight value"),
    ):
        for (line_kind, stage, tag), points in sorted(lines.items()):
            if line_kind != kind:
                continue
            points.sort()
            axes.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                "o-",
                markersize=3,
                label=f"{stage} {tag}",
            )
            match = found[f"{stage}/{tag}"]
            layer = int(match["layer"]) if match["layer"] is not None else None
            channel = int(match["row"])  # the super activation's row, on both panels
            figure._sw_marks.append(  # type: ignore[attr-defined]
                Mark(kind, f"{stage}/{tag}", layer, channel, points[-1][0], points[-1][1])
            )
        axes.set_xlabel("training step")
        axes.set_title(title)
        axes.grid(True, alpha=0.3)
        if axes.lines:
            axes.legend(fontsize=7)
    return figure
