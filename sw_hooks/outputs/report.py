"""A super-weight report drawn and written: figures, ``report.md``, ``report.html``, ``report.json``.

:func:`write_report` draws every figure from :class:`~sw_hooks.analysis.report_data.ReportData`
(measured by :func:`sw_hooks.analysis.report.collect_report`) and writes ``report.md`` with
the PNGs beside it, ``report.html`` (one self-contained file, the figures inside it) and
``report.json`` with every number shown. Nothing here runs a model.

Example:
    >>> data = collect_report(model, tokenizer, ids, model_name="my-model")  # doctest: +SKIP
    >>> write_report(data, "out/")  # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sw_hooks.analysis.report_data import ReportData
from sw_hooks.outputs.report_render import render_html, render_markdown
from sw_hooks.outputs.report_sections import FIGURES, report_blocks

__all__ = ["FIGURES", "markdown", "render_figures", "write_report"]


def render_figures(data: ReportData) -> dict[str, Any]:
    """``{file name: Figure}`` for every figure the data supports, in report order."""
    from sw_hooks.outputs import plots

    result = data.result
    figures: dict[str, Any] = {}
    if result.layer_peaks:
        figures["spikes.png"] = plots.activation_spikes(result.layer_peaks, result)
    if data.traces:
        first = data.traces[0]
        figures["residual.png"] = plots.residual_stream(
            first["original"], first["ablated"], first["super_weight"]
        )
        figures["weights.png"] = plots.weight_heatmaps(data.patches)
    if data.impact:
        figures["impact.png"] = plots.impact_bars(data.impact)
    if data.quantization.get("runs"):
        figures["quantization.png"] = plots.quantization_sweep(data.quantization)
    if data.comparison.get("layers"):
        pairs = data.comparison["layers"]
        figures["spike_profiles.png"] = plots.spike_profiles(
            [pair["original"] for pair in pairs],
            [pair["candidate"] for pair in pairs],
            (data.comparison["original"], data.comparison["candidate"]),
        )
    if data.history:
        figures["history.png"] = plots.monitoring_history(data.history)
    return figures


def write_report(data: ReportData, out: str | Path) -> Path:
    """Write ``report.md`` with the figures as PNGs, ``report.html`` and ``report.json`` into ``out``.

    ``report.html`` holds the same text as ``report.md`` and the PNGs themselves, so it is
    the one file to share.

    Returns:
        The path of ``report.md``.
    """
    from sw_hooks.outputs.plots import save_figure

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images = {}
    for name, figure in render_figures(data).items():
        images[name] = save_figure(figure, out / name).read_bytes()
    (out / "report.json").write_text(json.dumps(data.to_dict(), indent=2) + "\n")
    blocks = report_blocks(data, list(images))
    (out / "report.html").write_text(render_html(blocks, images), encoding="utf-8")
    path = out / "report.md"
    path.write_text(render_markdown(blocks), encoding="utf-8")
    return path


def markdown(data: ReportData, figures: Sequence[str]) -> str:
    """The report's Markdown: tables of the numbers and the figures with what each shows."""
    return render_markdown(report_blocks(data, figures))
