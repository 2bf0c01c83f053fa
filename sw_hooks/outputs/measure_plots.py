"""Figures of what super weights are worth: Table 1's conditions and the quantization sweep.

Example:
    >>> from sw_hooks.outputs.measure_plots import impact_bars  # doctest: +SKIP
    >>> fig = impact_bars(table1(model, ids, result.verified))  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from sw_hooks.analysis.impact import ImpactRow
from sw_hooks.outputs.figure_base import (
    OTHER_COLOUR,
    SUPER_COLOUR,
    Mark,
    loaded_all,
    new_figure,
)
from sw_hooks.quant.config import QuantConfig
from sw_hooks.quant.sweep import SweepRun

if TYPE_CHECKING:
    from matplotlib.figure import Figure


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
    table = loaded_all(rows, ImpactRow, "impact rows")
    names = [SHORT_CONDITIONS.get(r.condition, r.condition) for r in table]
    pruned = "super weights pruned"
    colours = [SUPER_COLOUR if r.condition == pruned else "#1f77b4" for r in table]
    figure, (left, right) = new_figure(10, 3.8, columns=2)
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
        runs: :func:`sw_hooks.quant.sweep.holdout_sweep` runs, or a JSON object with ``runs``
            and ``baseline_perplexity`` (what ``sw-hooks quantize --json`` writes).
        baseline: the unquantized perplexity, drawn as a dotted line.

    Example:
        >>> fig = quantization_sweep(holdout_sweep(model, configs, sws, measure), base)  # doctest: +SKIP
    """
    if isinstance(runs, Mapping):
        baseline = runs.get("baseline_perplexity", baseline)
        runs = runs.get("runs", ())
    table = loaded_all(runs, SweepRun, "quantization runs")
    figure, (axes,) = new_figure(6.5, 3.8)
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
