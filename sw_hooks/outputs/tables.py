"""The tables of a detection result, built once for every place that shows them.

:func:`weights_table` and :func:`super_experts_table` give a :class:`Table` of cells;
``sw-hooks detect`` prints it as fixed-width text (:func:`fixed_width`), the report writes it
as Markdown and HTML (:mod:`sw_hooks.outputs.report_render`).
"""

from __future__ import annotations

from dataclasses import dataclass

from sw_hooks.core.results import DetectionResult, SuperExpert, SuperWeight


class Code(str):
    """Table-cell text shown as code (a module name)."""


@dataclass(frozen=True)
class Table:
    """A table; ``numeric[i]`` right-aligns column ``i``."""

    header: tuple[str, ...]
    numeric: tuple[bool, ...]
    rows: tuple[tuple[str, ...], ...]


def _impact(value: float | None) -> str:
    return f"x{value:.2f}" if value is not None else "-"


def _scored(item: SuperWeight | SuperExpert) -> str:
    """The tokens an impact was scored on, ``*`` when screened after the first window."""
    if item.impact_tokens is None:
        return "-"
    return f"{item.impact_tokens}{'*' if item.screened else ''}"


def measured_on(result: DetectionResult) -> str | None:
    """What every impact of ``result`` was measured on, one line (``None``: not measured)."""
    if result.calibration is None:
        return None
    return f"impacts measured on: {result.calibration.describe()}"


def screened_note(result: DetectionResult) -> str | None:
    """What a ``*`` in the scored column means, with the guard's ratio on the other tokens."""
    calibration = result.calibration
    items = (*result.candidates, *result.super_experts)
    if calibration is None or not any(item.screened for item in items):
        return None
    rest = calibration.scored - (calibration.screened_tokens or 0)
    return (
        f"* screened: scored on the first window's {calibration.screened_tokens} tokens only; "
        f"all screened removed together: {_impact(calibration.screened_joint_ratio)} on the "
        f"other {rest} (below the bar)"
    )


def _order(weight: SuperWeight) -> tuple[bool, float]:
    """Super weights first, each group by falling impact."""
    return weight.verdict != "super", -(weight.impact or 0.0)


def weights_table(result: DetectionResult, loss: str | None = None) -> Table:
    """One row a candidate, super weights first; an ``expert`` column when any sits inside
    experts; the impact column names the loss when it is not perplexity."""
    experts = any(w.expert is not None for w in result.candidates)
    rows = tuple(
        (
            str(w.layer) if w.layer is not None else "-",
            *((str(w.expert) if w.expert is not None else "-",) if experts else ()),
            Code(w.module),
            f"[{w.row}, {w.col}]",
            f"{w.value:.4g}",
            f"{w.input_activation:.1f}",
            f"{w.output_activation:.1f}",
            str(w.token_position),
            _impact(w.impact),
            _scored(w),
            w.verdict,
        )
        for w in sorted(result.candidates, key=_order)
    )
    impact = f"impact ({loss})" if loss is not None else "impact"
    header = (
        "layer",
        *(("expert",) if experts else ()),
        "module",
        "[row, col]",
        "weight",
        "input act.",
        "output act.",
        "token",
        impact,
        "scored",
        "verdict",
    )
    numeric = (True, *((True,) if experts else ()), False, False, *([True] * 6))
    if not rows:
        rows = (("-", "no spike pairs found", *([""] * (len(header) - 2))),)
    return Table(header, (*numeric, False), rows)


def super_experts_table(result: DetectionResult) -> Table:
    """Whole experts whose output is massive, each verified by pruning its routing."""
    rows = tuple(
        (
            str(e.layer) if e.layer is not None else "-",
            str(e.expert),
            Code(e.module),
            f"{e.output_max:.1f}",
            str(e.channel),
            str(e.tokens),
            _impact(e.impact),
            _scored(e),
            e.verdict,
        )
        for e in result.super_experts
    )
    header = ("layer", "expert", "module", "peak |output|", "channel", "tokens", "impact", "scored")
    numeric = (True, True, False, True, True, True, True, True, False)
    return Table((*header, "verdict"), numeric, rows)


def fixed_width(table: Table) -> str:
    """The table as aligned plain text: a header, a rule, one line a row."""
    widths = [
        max(len(cell) for cell in column) for column in zip(table.header, *table.rows, strict=True)
    ]

    def line(cells: tuple[str, ...]) -> str:
        parts = [
            cell.rjust(width) if numeric else cell.ljust(width)
            for cell, width, numeric in zip(cells, widths, table.numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    header = line(table.header)
    return "\n".join([header, "-" * len(header), *map(line, table.rows)])
