"""Figures of super weights, drawn from the library's own result objects (or their JSON).

The figures live by topic (:mod:`~sw_hooks.outputs.spike_plots`,
:mod:`~sw_hooks.outputs.measure_plots`, :mod:`~sw_hooks.outputs.history_plots`, over the
shared :mod:`~sw_hooks.outputs.figure_base`); this module is their one index, so that
``from sw_hooks.outputs import plots`` reaches every figure.

Every function returns a matplotlib :class:`~matplotlib.figure.Figure` built without
``pyplot`` and records what it highlighted as :class:`Mark` objects that :func:`marks`
reads back. matplotlib is imported only when a figure is made:
``pip install "sw_hooks[plots]"``.

Example:
    >>> from sw_hooks.outputs.plots import impact_bars, save_figure  # doctest: +SKIP
    >>> save_figure(impact_bars(rows), "impact.png")  # doctest: +SKIP
"""

from __future__ import annotations

from sw_hooks.outputs.figure_base import DPI, OTHER_COLOUR, SUPER_COLOUR, Mark, marks, save_figure
from sw_hooks.outputs.history_plots import monitoring_history, read_history
from sw_hooks.outputs.measure_plots import SHORT_CONDITIONS, impact_bars, quantization_sweep
from sw_hooks.outputs.spike_plots import (
    activation_spikes,
    residual_stream,
    spike_profiles,
    weight_heatmaps,
)

__all__ = [
    "DPI",
    "OTHER_COLOUR",
    "SHORT_CONDITIONS",
    "SUPER_COLOUR",
    "Mark",
    "activation_spikes",
    "impact_bars",
    "marks",
    "monitoring_history",
    "quantization_sweep",
    "read_history",
    "residual_stream",
    "save_figure",
    "spike_profiles",
    "weight_heatmaps",
]
