"""Watch super weights over time: the decisions the training callbacks make, framework-free.

:func:`fold_recording` is the step every monitor takes per recording: skip it if it holds a
NaN or infinite activation (:class:`~sw_hooks.training.nonfinite.NonFiniteSteps`), else fold it
into a :class:`~sw_hooks.training.tracker.SpikeTracker` (whose
:class:`~sw_hooks.training.events.WeightEvent` s say what happened to each super weight), then
name the scalars to log with :func:`metric_values`. The loop around it (recorder, schedule,
cross-process reduction, checkpoints) is :class:`sw_hooks.training.session.MonitorSession`, and
:func:`sw_hooks.training.session.watch` (also importable from here) wraps it around any forward
code (``generate``, a plain training loop).

Every name of the tracker, its events and the non-finite handling stays importable from here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sw_hooks.core.access import Coordinate
from sw_hooks.core.units import Unit
from sw_hooks.training.events import (
    EVENT_KINDS,
    WARNING_KINDS,
    WeightEvent,
    module_tag,
    weight_tag,
)
from sw_hooks.training.nonfinite import (
    NonFiniteActivation,
    NonFiniteActivationError,
    NonFiniteSteps,
    NonFiniteWarning,
    Warn,
    find_nonfinite,
    warn_nonfinite,
)
from sw_hooks.training.tracker import (
    Measure,
    Recording,
    SpikeTracker,
    ValueReader,
    as_super_weight,
    as_units,
    qualify,
    read_weight,
    unit_of,
)

__all__ = [
    "EVENT_KINDS",
    "WARNING_KINDS",
    "Decision",
    "Measure",
    "NonFiniteActivation",
    "NonFiniteActivationError",
    "NonFiniteSteps",
    "NonFiniteWarning",
    "Recording",
    "SpikeTracker",
    "ValueReader",
    "Warn",
    "WeightEvent",
    "as_super_weight",
    "as_units",
    "find_nonfinite",
    "fold_recording",
    "metric_values",
    "module_tag",
    "qualify",
    "read_weight",
    "unit_of",
    "warn_nonfinite",
    "weight_tag",
]


@dataclass(frozen=True)
class Decision:
    """What one recording gave: the events it caused and the scalars to log."""

    events: list[WeightEvent]
    values: dict[str, float]
    skipped: bool


def fold_recording(
    tracker: SpikeTracker,
    model: nn.Module,
    stats: Recording,
    nonfinite: NonFiniteSteps,
    *,
    step: int,
    stage: str,
    prefix: str = "sw",
    measure: Measure | None = None,
) -> Decision:
    """Fold one (already reduced) recording into ``tracker``, unless it is not finite.

    The step every monitor takes per recording, so they all decide alike. A skipped
    recording causes no events and logs only the totals (``super_weights``, event counts,
    ``nonfinite_steps``). ``stats`` is keyed by unit (or by dense module name).
    ``measure`` verifies new candidates (see :meth:`SpikeTracker.update`).
    """
    stats = as_units(stats)
    if not nonfinite.admit(stats, step=step, stage=stage):
        values = metric_values(
            {}, tracker, {}, stage=stage, prefix=prefix, nonfinite_steps=nonfinite.count
        )
        return Decision([], values, skipped=True)
    with torch.no_grad():
        events = tracker.update(model, stats, step=step, stage=stage, measure=measure)
        current = tracker.current(model, stats)
    values = metric_values(
        stats, tracker, current, events, stage=stage, prefix=prefix, nonfinite_steps=nonfinite.count
    )
    return Decision(events, values, skipped=False)


def metric_values(
    stats: Recording,
    tracker: SpikeTracker,
    current: Mapping[Coordinate, tuple[float, float]],
    events: Iterable[WeightEvent] = (),
    *,
    stage: str = "train",
    prefix: str = "sw",
    nonfinite_steps: int = 0,
) -> dict[str, float]:
    """The scalars the callbacks log, under stable names (``<prefix>/<stage>/...``).

    * ``<layer>/input_max``, ``<layer>/output_max``: the down-projection's largest
      ``|input|`` and ``|output|`` (``<layer>`` is ``layer_<L>``);
    * ``<weight>/value``, ``<weight>/activation``: each tracked weight's value and its
      super activation (``|output|`` at its row), ``<weight>`` being
      ``layer_<L>.row_<r>.col_<c>``; ``<weight>/impact`` once it is measured;
    * ``candidates``: how many spike pairs are tracked; ``super_weights``: how many of them
      are super weights (measured so, or given); ``events/<kind>``: events of each kind so far;
    * ``event/<kind>/<weight>``: ``1.0`` at the recording where that event happened;
    * ``<prefix>/nonfinite_steps``: recordings skipped so far for a NaN or infinite
      activation (see :class:`NonFiniteSteps`).
    """
    base = f"{prefix}/{stage}"
    values: dict[str, float] = {}
    for key, unit_stats in stats.items():
        tag = module_tag(Unit.of(key).module)  # an experts module logs its loudest expert
        for side in ("input", "output"):
            maxima = getattr(unit_stats, side)
            if maxima is not None:
                name = f"{base}/{tag}/{side}_max"
                values[name] = max(values.get(name, 0.0), float(maxima.abs_max.max()))
    impacts = {w.coordinate: w.impact for w in tracker.candidates}
    for coordinate, (value, activation) in current.items():
        tag = weight_tag(coordinate.module, coordinate.row, coordinate.col, coordinate.expert)
        values[f"{base}/{tag}/value"] = float(value)
        values[f"{base}/{tag}/activation"] = float(activation)
        if impacts.get(coordinate) is not None:
            values[f"{base}/{tag}/impact"] = float(impacts[coordinate])
    values[f"{base}/candidates"] = float(len(tracker.candidates))
    values[f"{base}/super_weights"] = float(len(tracker.super_weights))
    for kind in EVENT_KINDS:
        values[f"{prefix}/events/{kind}"] = float(sum(e.kind == kind for e in tracker.events))
    for event in events:
        values[f"{prefix}/event/{event.kind}/{event.tag}"] = 1.0
    values[f"{prefix}/nonfinite_steps"] = float(nonfinite_steps)
    return values


def __getattr__(name: str) -> Any:
    """``watch`` and ``Watch`` live in :mod:`sw_hooks.training.session`; they stay importable from here."""
    if name in ("watch", "Watch"):
        from sw_hooks.training import session

        return getattr(session, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
