"""What every figure of :mod:`sw_hooks.outputs.plots` shares: a headless canvas, marks, input reading.

Every figure is a matplotlib :class:`~matplotlib.figure.Figure` built without ``pyplot``
(no global state, no display: the ``Agg`` canvas), and records what it highlighted as
:class:`Mark` objects that :func:`marks` reads back, so a test can check *which* layer
and channel a figure points at from the data it drew, not from pixels. Figures take the
library's result objects or their JSON; :func:`loaded` is the one place JSON is read.

matplotlib is imported only when a figure is made: ``pip install "sw_hooks[plots]"``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sw_hooks.analysis.impact import ImpactRow
from sw_hooks.core.results import DetectionResult, SuperWeight
from sw_hooks.quant.config import QuantConfig
from sw_hooks.quant.sweep import SweepRun

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

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


def new_figure(width: float, height: float, columns: int = 1) -> tuple[Figure, list[Axes]]:
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


def integer_layers(axes: Axes) -> None:
    from matplotlib.ticker import MaxNLocator

    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.margins(x=0.08)


def draw_mark(figure: Figure, axes: Axes, mark: Mark, *, colour: str, filled: bool = True) -> None:
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


def loaded(item: Any, kind: type[_Result]) -> _Result:
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


def loaded_all(items: Iterable[Any], kind: type[_Result], what: str) -> list[_Result]:
    """Every item as a ``kind``; nothing to draw is an error."""
    loaded_items = [loaded(item, kind) for item in items]
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


def as_super_weights(weights: Any) -> list[SuperWeight]:
    """Super weights from a result, its JSON, or a list of either kind of weight."""
    if isinstance(weights, DetectionResult | Mapping):
        return list(loaded(weights, DetectionResult).candidates)
    if isinstance(weights, Iterable) and not isinstance(weights, str | bytes):
        return [loaded(w, SuperWeight) for w in weights]
    raise ValueError(
        f"expected super weights, a DetectionResult or its JSON, got {type(weights).__name__}"
    )
