"""Track a model's candidate super weights across recordings: which are known, and what happened.

:class:`SpikeTracker` takes one recording (``{module: ChannelStats}``) at a time and keeps
the history: which candidates are known (each spike pair seen, with its measured impact and
verdict once measured), the value and super activation each had when first seen, and the
:class:`~sw_hooks.training.events.WeightEvent` s so far. New spike pairs come from
:func:`sw_hooks.analysis.detect.spike_candidates`, so the monitors and detection agree on
what a spike is; a ``measure`` function given to :meth:`SpikeTracker.update` decides which of
them are super weights. :func:`qualify` renames coordinates given relative to the bare transformer to
full names inside a training wrapper.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from sw_hooks.core.access import Coordinate, CoordinateLike, WeightElement
from sw_hooks.core.locate import layer_index
from sw_hooks.core.record import ChannelStats
from sw_hooks.core.results import SuperWeight
from sw_hooks.core.units import Unit
from sw_hooks.training.events import WeightEvent

ValueReader = Callable[[nn.Module, Coordinate], float]
Measure = Callable[[list[SuperWeight]], list[SuperWeight]]
"""``measure(candidates)``: the same candidates, each with its impact and verdict."""
Recording = Mapping[str, ChannelStats] | Mapping[Unit, ChannelStats]
"""One recording: ``{Unit: ChannelStats}`` (or ``{dense module name: ChannelStats}``)."""


def as_units(stats: Mapping[Any, ChannelStats]) -> dict[Unit, ChannelStats]:
    """A recording keyed by :class:`Unit` (plain module names are dense units)."""
    return {Unit.of(key): value for key, value in stats.items()}


def unit_of(coordinate: Coordinate) -> Unit:
    return Unit(coordinate.module, coordinate.expert)


def read_weight(model: nn.Module, coordinate: Coordinate) -> float:
    """The weight's value as a float (gathers an FSDP2 shard: call it on every rank)."""
    return WeightElement.resolve(model, coordinate).read_float()


@dataclass
class _Tracked:
    weight: SuperWeight
    reference_activation: float | None
    flags: set[str] = field(default_factory=set)


class SpikeTracker:
    """The history of a model's super weights across recordings.

    Args:
        super_weights: super weights known in advance (``SuperWeight`` or ``(module, row,
            col)``): taken as super weights without measuring; their reference activation
            is taken at the first recording.
        collapse_factor: a weight collapses when its super activation falls below
            ``reference / collapse_factor``.
        drift_fraction: a weight drifts when ``|value - reference| > drift_fraction * |reference|``.
        spike_options: passed to :func:`sw_hooks.analysis.detect.spike_candidates`.

    Example:
        >>> import torch
        >>> from sw_hooks.core.record import record
        >>> from sw_hooks.testing import planted_llama
        >>> planted = planted_llama()
        >>> tracker = SpikeTracker()
        >>> with record(planted.model) as rec, torch.no_grad():
        ...     _ = planted.model(planted.prompt())
        >>> [(e.kind, e.row, e.col) for e in tracker.update(planted.model, rec.stats, step=0)]
        [('found', 5, 17), ('found', 9, 33)]
    """

    def __init__(
        self,
        super_weights: Iterable[CoordinateLike] = (),
        *,
        collapse_factor: float = 10.0,
        drift_fraction: float = 0.5,
        spike_options: Mapping[str, Any] | None = None,
    ) -> None:
        if not collapse_factor > 1.0:
            raise ValueError(f"collapse_factor must be > 1, got {collapse_factor!r}")
        if not drift_fraction > 0.0:
            raise ValueError(f"drift_fraction must be > 0, got {drift_fraction!r}")
        self.collapse_factor = float(collapse_factor)
        self.drift_fraction = float(drift_fraction)
        self.spike_options = dict(spike_options or {})
        self._tracked: dict[Coordinate, _Tracked] = {}
        self.events: list[WeightEvent] = []
        self.recordings = 0
        for weight in super_weights:
            self._add(replace(as_super_weight(weight), verdict="super"), activation=None)

    @property
    def candidates(self) -> list[SuperWeight]:
        """Every weight tracked (each spike pair seen, and those given), in the order first
        seen, with its reference value and, once measured, its impact and verdict."""
        return [t.weight for t in self._tracked.values()]

    @property
    def super_weights(self) -> list[SuperWeight]:
        """The tracked weights that are super weights: measured so, or given as such."""
        return [w for w in self.candidates if w.verdict == "super"]

    def unmeasured(self) -> list[SuperWeight]:
        """Candidates not measured yet (weights given as super weights are never measured)."""
        return [w for w in self.candidates if w.impact is None and w.verdict != "super"]

    def qualify(self, model: nn.Module) -> None:
        """Rename known weights to their full module names inside ``model`` (see :func:`qualify`)."""
        renamed = qualify(model, [t.weight for t in self._tracked.values()])
        self._tracked = {
            weight.coordinate: _Tracked(weight, t.reference_activation, t.flags)
            for weight, t in zip(renamed, self._tracked.values(), strict=True)
        }

    def status(self, coordinate: CoordinateLike) -> set[str]:
        """The weight's current flags: a subset of ``{"collapsed", "drifted"}``."""
        return set(self._tracked[Coordinate.of(coordinate)].flags)

    def update(
        self,
        model: nn.Module,
        stats: Recording,
        *,
        step: int,
        stage: str = "train",
        read_value: ValueReader = read_weight,
        measure: Measure | None = None,
    ) -> list[WeightEvent]:
        """Fold in one recording; return (and keep) the events it caused.

        ``measure`` (optional) measures every candidate not measured yet, the new spike
        pairs of this recording among them, once: their events carry impact and verdict.
        """
        stats = as_units(stats)
        new = self._new_spikes(model, stats, step, stage, measure)
        changed = self._check_known(model, stats, step, stage, read_value)
        self.recordings += 1
        self.events += new + changed
        return new + changed

    def current(
        self,
        model: nn.Module,
        stats: Recording,
        read_value: ValueReader = read_weight,
    ) -> dict[Coordinate, tuple[float, float]]:
        """``{coordinate: (value, super activation)}`` of every known weight recorded in ``stats``."""
        stats = as_units(stats)
        return {
            coordinate: (read_value(model, coordinate), _activation(stats, coordinate))
            for coordinate in self._tracked
            if unit_of(coordinate) in stats
        }

    def _new_spikes(self, model, stats, step: int, stage: str, measure) -> list[WeightEvent]:
        from sw_hooks.analysis.detect import spike_candidates

        kind = "found" if self.recordings == 0 else "appeared"
        new = [
            candidate
            for candidate in spike_candidates(model, stats, **self.spike_options)
            if candidate.coordinate not in self._tracked
        ]
        for candidate in new:
            self._add(candidate, abs(candidate.output_activation))
        if measure is not None:
            self._record_measurements(measure(self.unmeasured()))
        events = []
        for candidate in new:
            tracked = self._tracked[candidate.coordinate]
            value, activation = candidate.value, tracked.reference_activation
            events.append(self._event(step, kind, tracked.weight, value, activation, stage))
        return events

    def _record_measurements(self, measured: list[SuperWeight]) -> None:
        """Keep each measured weight's impact and verdict (its reference values stay)."""
        for weight in measured:
            tracked = self._tracked[weight.coordinate]
            tracked.weight = replace(tracked.weight, impact=weight.impact, verdict=weight.verdict)

    def _check_known(self, model, stats, step: int, stage: str, read_value) -> list[WeightEvent]:
        events = []
        for coordinate, tracked in self._tracked.items():
            if unit_of(coordinate) not in stats:
                continue  # not recorded (or the expert not routed) this time: no evidence
            value, activation = read_value(model, coordinate), _activation(stats, coordinate)
            if tracked.reference_activation is None:
                tracked.reference_activation = activation
                tracked.weight = replace(tracked.weight, value=value, output_activation=activation)
            flags = self._flags(tracked, value, activation)
            for kind in sorted(flags - tracked.flags):
                events.append(self._event(step, kind, tracked.weight, value, activation, stage))
            if tracked.flags and not flags:
                events.append(
                    self._event(step, "recovered", tracked.weight, value, activation, stage)
                )
            tracked.flags = flags
        return events

    def _flags(self, tracked: _Tracked, value: float, activation: float) -> set[str]:
        flags = set()
        if activation * self.collapse_factor < (tracked.reference_activation or 0.0):
            flags.add("collapsed")
        reference = tracked.weight.value
        if abs(value - reference) > self.drift_fraction * abs(reference):
            flags.add("drifted")
        return flags

    def _add(self, weight: SuperWeight, activation: float | None) -> None:
        self._tracked[weight.coordinate] = _Tracked(weight, activation)

    def _event(self, step, kind, weight: SuperWeight, value, activation, stage) -> WeightEvent:
        tracked = self._tracked[weight.coordinate]
        return WeightEvent(
            step=int(step),
            kind=kind,
            module=weight.module,
            row=weight.row,
            col=weight.col,
            value=float(value),
            activation=float(activation),
            reference_value=float(tracked.weight.value),
            reference_activation=float(tracked.reference_activation or 0.0),
            stage=stage,
            expert=weight.expert,
            impact=tracked.weight.impact,
            verdict=tracked.weight.verdict,
        )

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain Python data (JSON-friendly): known weights, references, flags, events."""
        return {
            "recordings": self.recordings,
            "tracked": [
                {
                    "weight": t.weight.to_dict(),
                    "reference_activation": t.reference_activation,
                    "flags": sorted(t.flags),
                }
                for t in self._tracked.values()
            ],
            "events": [e.to_dict() for e in self.events],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the history with a :meth:`state_dict`."""
        tracked = {}
        for item in state["tracked"]:
            weight = SuperWeight.from_dict(item["weight"])
            tracked[weight.coordinate] = _Tracked(
                weight, item["reference_activation"], set(item["flags"])
            )
        self._tracked = tracked
        self.events = [WeightEvent(**e) for e in state["events"]]
        self.recordings = int(state["recordings"])


def as_super_weight(weight: CoordinateLike) -> SuperWeight:
    """A :class:`SuperWeight` from any coordinate (a bare one gets its value later)."""
    coordinate = Coordinate.of(weight)
    if isinstance(weight, SuperWeight):
        return weight
    module, row, col = coordinate.module, coordinate.row, coordinate.col
    return SuperWeight(
        module=module,
        layer=layer_index(module),
        row=row,
        col=col,
        value=0.0,
        expert=coordinate.expert,
    )


def _activation(stats: Mapping[Unit, ChannelStats], coordinate: Coordinate) -> float:
    output = stats[unit_of(coordinate)].output
    return float(output.abs_max[coordinate.row]) if output is not None else 0.0


def qualify(model: nn.Module, weights: Iterable[CoordinateLike]) -> list[SuperWeight]:
    """Rename each weight's module to its full name inside ``model``.

    Coordinates are usually given relative to the bare transformer
    (``model.layers.11.mlp.down_proj``) while a training wrapper holds it as an attribute
    (``net.model.layers.11.mlp.down_proj``); a name that is not in ``model`` is matched by
    suffix, and must match exactly one module.
    """
    names = [name for name, _ in model.named_modules()]
    qualified = []
    for weight in map(as_super_weight, weights):
        full = _full_name(names, weight.module, type(model).__name__)
        qualified.append(replace(weight, module=full))
    return qualified


def _full_name(names: list[str], name: str, owner: str) -> str:
    if name in names:
        return name
    matches = [n for n in names if n.endswith("." + name)]
    if len(matches) != 1:
        found = "no module" if not matches else f"{len(matches)} modules ({matches[:3]})"
        raise ValueError(f"{found} named {name!r} or ending in '.{name}' in {owner}")
    return matches[0]
