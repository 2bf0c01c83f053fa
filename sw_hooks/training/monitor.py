"""Watch super weights over time: the decisions the training callbacks make, framework-free.

:class:`SpikeTracker` takes one recording (``{module: ChannelStats}``) at a time and keeps
the history: which super weights are known, the value and super activation each had when
first seen, and the events so far:

* ``"found"``: a spike pair present at the first recording;
* ``"appeared"``: a spike pair that was not there before (a weight became super);
* ``"collapsed"``: a known weight's super activation fell below its reference divided by
  ``collapse_factor``;
* ``"drifted"``: a known weight's value moved by more than ``drift_fraction`` of its
  reference value;
* ``"recovered"``: a collapsed or drifted weight is back within both bounds.

New spike pairs come from :func:`sw_hooks.analysis.detect.spike_candidates`, so the callbacks and
detection agree on what a spike is. :func:`fold_recording` is the step every monitor takes
per recording (skip it if non-finite, else track it, then name the scalars with
:func:`metric_values`). The loop around it (recorder, schedule, cross-process reduction,
checkpoints) is :class:`sw_hooks.training.session.MonitorSession`, and :func:`sw_hooks.training.session.watch`
(also importable from here) wraps it around any forward code (``generate``, a plain
training loop).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from sw_hooks.core.access import Coordinate, CoordinateLike, WeightElement
from sw_hooks.core.locate import layer_index
from sw_hooks.core.record import ChannelStats
from sw_hooks.core.results import SuperWeight
from sw_hooks.core.units import Unit

EVENT_KINDS = ("found", "appeared", "collapsed", "drifted", "recovered")
WARNING_KINDS = ("appeared", "collapsed", "drifted")
ValueReader = Callable[[nn.Module, Coordinate], float]
Recording = Mapping[str, ChannelStats] | Mapping[Unit, ChannelStats]
"""One recording: ``{Unit: ChannelStats}`` (or ``{dense module name: ChannelStats}``)."""
Warn = Callable[[str], None]


@dataclass(frozen=True)
class WeightEvent:
    """Something that happened to one super weight at one recording."""

    step: int
    kind: str
    module: str
    row: int
    col: int
    value: float
    activation: float
    reference_value: float
    reference_activation: float
    stage: str = "train"
    expert: int | None = None

    @property
    def tag(self) -> str:
        return weight_tag(self.module, self.row, self.col, self.expert)

    def describe(self) -> str:
        inside = f" (expert {self.expert})" if self.expert is not None else ""
        return (
            f"super weight {self.module}[{self.row}, {self.col}]{inside} {self.kind} at {self.stage} "
            f"step {self.step}: value {self.value:.4g} (was {self.reference_value:.4g}), "
            f"super activation {self.activation:.4g} (was {self.reference_activation:.4g})"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def weight_tag(module: str, row: int, col: int, expert: int | None = None) -> str:
    """A stable, logger-safe name for one weight: ``layer_<L>.row_<r>.col_<c>``, with
    ``.expert_<e>`` after the layer for a weight inside an expert."""
    base = module_tag(module)
    if expert is not None:
        base = f"{base.removesuffix('.experts')}.expert_{expert}"
    return f"{base}.row_{row}.col_{col}"


def module_tag(module: str) -> str:
    """``layer_<L>`` for a module with a layer index, else its name with dots as underscores.

    An experts module's down-projection is ``layer_<L>.experts``, next to a dense (shared
    expert) down-projection of the same layer.
    """
    index = layer_index(module)
    if index is None:
        return re.sub(r"[^\w]", "_", module)
    return f"layer_{index}.experts" if ".experts." in f"{module}." else f"layer_{index}"


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
        super_weights: weights known in advance (``SuperWeight`` or ``(module, row, col)``);
            their reference activation is taken at the first recording.
        collapse_factor: a weight collapses when its super activation falls below
            ``reference / collapse_factor``.
        drift_fraction: a weight drifts when ``|value - reference| > drift_fraction * |reference|``.
        spike_options: passed to :func:`sw_hooks.analysis.detect.spike_candidates`.

    Example:
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
            self._add(as_super_weight(weight), activation=None)

    @property
    def super_weights(self) -> list[SuperWeight]:
        """Every known super weight, in the order first seen, with its reference value."""
        return [t.weight for t in self._tracked.values()]

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
    ) -> list[WeightEvent]:
        """Fold in one recording; return (and keep) the events it caused."""
        stats = as_units(stats)
        new = self._new_spikes(model, stats, step, stage)
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

    def _new_spikes(self, model, stats, step: int, stage: str) -> list[WeightEvent]:
        from sw_hooks.analysis.detect import spike_candidates

        kind = "found" if self.recordings == 0 else "appeared"
        events = []
        for candidate in spike_candidates(model, stats, **self.spike_options):
            if candidate.coordinate in self._tracked:
                continue
            activation = abs(candidate.output_activation)
            self._add(candidate, activation)
            events.append(self._event(step, kind, candidate, candidate.value, activation, stage))
        return events

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


class NonFiniteActivationError(ValueError):
    """A recording held a NaN or infinite activation and the monitor was made ``strict``."""


class NonFiniteWarning(UserWarning):
    """A recording held a NaN or infinite activation and the monitor skipped it."""


@dataclass(frozen=True)
class NonFiniteActivation:
    """The first NaN or infinite per-channel maximum in a recording."""

    module: str
    side: str
    channel: int
    value: float

    def describe(self, step: int, stage: str) -> str:
        return (
            f"non-finite activation ({self.value}) in the {self.side} of {self.module}, "
            f"channel {self.channel}, at {stage} step {step}"
        )


def find_nonfinite(stats: Recording) -> NonFiniteActivation | None:
    """The first module, side and channel whose maximum is NaN or infinite, if any.

    One device-to-host read when everything is finite (the usual case).

    Example:
        >>> from sw_hooks.core.record import channel_maxima
        >>> bad = channel_maxima(torch.tensor([[[1.0, float("inf")]]]))
        >>> find_nonfinite({"mlp": ChannelStats(None, bad, 1)})
        NonFiniteActivation(module='mlp', side='output', channel=1, value=inf)
    """
    sides = [
        (str(name), side, maxima)
        for name, module_stats in stats.items()
        for side in ("input", "output")
        if (maxima := getattr(module_stats, side)) is not None
    ]
    if not sides or bool(torch.cat([m.abs_max.isfinite() for _, _, m in sides]).all()):
        return None
    for name, side, maxima in sides:
        bad = (~maxima.abs_max.isfinite()).nonzero()
        if len(bad):
            channel = int(bad[0, 0])
            return NonFiniteActivation(name, side, channel, float(maxima.value[channel]))
    return None


def warn_nonfinite(message: str) -> None:
    """The default warning for a skipped recording: ``warnings.warn`` with :class:`NonFiniteWarning`."""
    warnings.warn(message, NonFiniteWarning, stacklevel=4)


class NonFiniteSteps:
    """Skips recordings that hold a NaN or infinite activation, counts them, warns once.

    An fp16 overflow makes one step's activations infinite; ``GradScaler`` skips that
    step's update and training goes on, so monitoring must not end the run either. The
    first skipped recording is warned about (module, channel, step), every one is counted
    (logged as ``<prefix>/nonfinite_steps``). ``strict=True`` raises
    :class:`NonFiniteActivationError` instead.

    Args:
        strict: raise instead of skipping.
        warn: how to warn (``lightning``'s ``rank_zero_warn`` under Lightning);
            default ``warnings.warn`` with :class:`NonFiniteWarning`.
        prefix: the first component of the logged count's name.
    """

    def __init__(
        self, *, strict: bool = False, warn: Warn = warn_nonfinite, prefix: str = "sw"
    ) -> None:
        self.strict = strict
        self.count = 0
        self.metric_name = f"{prefix}/nonfinite_steps"
        self._warn = warn
        self._warned = False

    def admit(self, stats: Recording, *, step: int, stage: str) -> bool:
        """``True`` when ``stats`` are finite; otherwise count and skip them (or raise)."""
        found = find_nonfinite(stats)
        if found is None:
            return True
        where = found.describe(step, stage)
        if self.strict:
            raise NonFiniteActivationError(
                f"{where}: the model overflowed or holds NaN/inf weights (strict=True)"
            )
        self.count += 1
        if not self._warned:
            self._warned = True
            self._warn(
                f"{where}: recording skipped (counted in {self.metric_name}); "
                "pass strict=True to raise instead"
            )
        return False


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
) -> Decision:
    """Fold one (already reduced) recording into ``tracker``, unless it is not finite.

    The step every monitor takes per recording, so they all decide alike. A skipped
    recording causes no events and logs only the totals (``super_weights``, event counts,
    ``nonfinite_steps``). ``stats`` is keyed by unit (or by dense module name).
    """
    stats = as_units(stats)
    if not nonfinite.admit(stats, step=step, stage=stage):
        values = metric_values(
            {}, tracker, {}, stage=stage, prefix=prefix, nonfinite_steps=nonfinite.count
        )
        return Decision([], values, skipped=True)
    with torch.no_grad():
        events = tracker.update(model, stats, step=step, stage=stage)
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
    * ``<weight>/value``, ``<weight>/activation``: each known super weight's value and its
      super activation (``|output|`` at its row), ``<weight>`` being
      ``layer_<L>.row_<r>.col_<c>``;
    * ``super_weights``: how many are known; ``events/<kind>``: events of each kind so far;
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
    for coordinate, (value, activation) in current.items():
        tag = weight_tag(coordinate.module, coordinate.row, coordinate.col, coordinate.expert)
        values[f"{base}/{tag}/value"] = float(value)
        values[f"{base}/{tag}/activation"] = float(activation)
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
