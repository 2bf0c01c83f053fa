"""Figures of super weights over training: the monitor's logged values against the step.

Example:
    >>> from sw_hooks.outputs.history_plots import monitoring_history  # doctest: +SKIP
    >>> fig = monitoring_history("lightning_logs/version_0/metrics.csv")  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from sw_hooks.outputs.figure_base import Mark, new_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure


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
    figure, (left, right) = new_figure(10, 3.8, columns=2)
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
