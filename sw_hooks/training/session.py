"""One monitoring session: record on a schedule, reduce, track, and name what was seen.

The loop every monitor runs is written here once: attach a recorder when a step is due
(:meth:`MonitorSession.start`), remove it and max-reduce what it recorded across processes
(:class:`~sw_hooks.training.metrics.ChannelMax`, optional), skip a recording holding a NaN or
infinite activation (:class:`~sw_hooks.training.monitor.NonFiniteSteps`), fold it into a
:class:`~sw_hooks.training.monitor.SpikeTracker`, measure each new candidate once
(:class:`~sw_hooks.training.verification.CandidateVerifier`) and name the scalars to log
(:meth:`MonitorSession.finish`). The Lightning callback, the Hugging Face callback and
:func:`watch` only translate their own hooks into these calls, and report (warn, log)
in their framework's way. Nothing here imports a training framework.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from sw_hooks.analysis.verify import VerifySettings
from sw_hooks.core.access import CoordinateLike
from sw_hooks.core.experts import ExpertsModule
from sw_hooks.core.maxima import ExpertStats
from sw_hooks.core.record import LOCATED_CHANNELS, ChannelStats, Locations, Recorder, select_units
from sw_hooks.core.results import SuperWeight
from sw_hooks.core.structure import ExampleInputNeeded
from sw_hooks.core.units import Unit
from sw_hooks.training.metrics import ChannelMax
from sw_hooks.training.monitor import (
    Decision,
    NonFiniteSteps,
    SpikeTracker,
    Warn,
    WeightEvent,
    fold_recording,
    warn_nonfinite,
)
from sw_hooks.training.verification import CandidateVerifier


class MonitorSession:
    """Monitor a model's super weights over a run: the recorder, reduction, tracker, verification.

    Call :meth:`start` before a step's forward passes and :meth:`finish` after them; a
    step is recorded when ``step % every_n_steps == 0`` (or with ``start(step,
    always=True)``, e.g. over a validation epoch). :meth:`finish` gives a
    :class:`~sw_hooks.training.monitor.Decision` (events and the scalars named by
    :func:`~sw_hooks.training.monitor.metric_values`) and keeps :attr:`last_values` and
    :attr:`last_stats`. The history (tracker, skipped-step count, last values) is saved by
    :meth:`state_dict`.

    A spike pair is a *candidate*. With ``verify=True`` (default) each new candidate's
    impact is measured once, when it first shows (:mod:`sw_hooks.training.verification`),
    on the ``calibration`` batch, else on the batch given to :meth:`hold_out` (the first
    validation batch), else on the first batch the model ran on while recorded: only those
    that reach ``verify_settings.min_impact`` are :attr:`super_weights`.

    The model can be given now or later with :meth:`bind` (a training framework hands it
    over only at setup, while the history must exist from the start).

    Args:
        model: the model to record (or ``None`` and :meth:`bind` later).
        pattern: where the down-projections are, for unknown architectures (a glob or
            compiled regex, as :func:`~sw_hooks.core.locate.find_down_projections`).
        every_n_steps: record one step out of this many.
        super_weights: super weights to watch from the start (names relative to ``model``
            or to a model it holds), taken as such without measuring; others are found on
            the fly.
        collapse_factor, drift_fraction, spike_options: see
            :class:`~sw_hooks.training.monitor.SpikeTracker`.
        prefix: the first component of every scalar's name.
        strict: raise :class:`~sw_hooks.training.monitor.NonFiniteActivationError` on a non-finite
            activation instead of skipping that recording.
        warn: how to warn about the first skipped recording (default ``warnings.warn``).
        locations: which channels keep the token position of their maximum, as
            ``record(locations=...)``.
        reduce_across_processes: max-reduce each recording across processes with
            :class:`~sw_hooks.training.metrics.ChannelMax` before deciding (a no-op on one process),
            so every rank decides alike; every rank must then call :meth:`finish`.
        process_group: the group to reduce over (default: every process).
        verify: measure each new candidate; ``False`` measures nothing, and the guard and the
            ablation act on every candidate (:attr:`targets`).
        calibration: the held-out batch to measure on (token ids ``[batch, tokens]``, a dict
            with ``input_ids``, or a tuple starting with them).
        verify_settings: the threshold and window of the measurement.

    Example:
        >>> from sw_hooks.testing import planted_llama
        >>> planted = planted_llama()
        >>> session = MonitorSession(planted.model, every_n_steps=10)
        >>> session.start(step=0)
        True
        >>> with torch.no_grad():
        ...     _ = planted.model(planted.prompt())
        >>> [(e.kind, e.row, e.col, e.verdict) for e in session.finish("train").events]
        [('found', 5, 17, 'super'), ('found', 9, 33, 'candidate')]
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        pattern: str | re.Pattern[str] | None = None,
        *,
        every_n_steps: int = 1,
        super_weights: Iterable[CoordinateLike] = (),
        collapse_factor: float = 10.0,
        drift_fraction: float = 0.5,
        spike_options: Mapping[str, Any] | None = None,
        prefix: str = "sw",
        strict: bool = False,
        warn: Warn = warn_nonfinite,
        locations: Locations = LOCATED_CHANNELS,
        reduce_across_processes: bool = False,
        process_group: Any = None,
        verify: bool = True,
        calibration: Any = None,
        verify_settings: VerifySettings | None = None,
    ) -> None:
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be a positive integer, got {every_n_steps!r}")
        self.every_n_steps, self.prefix, self.locations = every_n_steps, prefix, locations
        self.tracker = SpikeTracker(
            super_weights,
            collapse_factor=collapse_factor,
            drift_fraction=drift_fraction,
            spike_options=spike_options,
        )
        self.nonfinite = NonFiniteSteps(strict=strict, warn=warn, prefix=prefix)
        self.last_values: dict[str, float] = {}
        self.last_stats: dict[str, ChannelStats | ExpertStats] = {}
        self.step = 0
        self._pattern = pattern
        self._reduce_across = reduce_across_processes
        self._process_group = process_group
        self._model: nn.Module | None = None
        self._modules: dict[str, nn.Module] | None = {}  # None: found on the first call
        self._experts: dict[str, ExpertsModule] = {}
        self._metric: ChannelMax | None = None
        self._recorder: Recorder | None = None
        self.verifier = (
            CandidateVerifier(verify_settings, calibration, process_group) if verify else None
        )
        if model is not None:
            self.bind(model)

    # -- what the adapters read ----------------------------------------------------------
    @property
    def events(self) -> list[WeightEvent]:
        """Every event so far, in order (a copy)."""
        return list(self.tracker.events)

    @property
    def candidates(self) -> list[SuperWeight]:
        """Every weight tracked, with the value it had when first seen and, once measured,
        its impact and verdict."""
        return self.tracker.candidates

    @property
    def super_weights(self) -> list[SuperWeight]:
        """The super weights: candidates measured so, and weights given as such."""
        return self.tracker.super_weights

    @property
    def targets(self) -> list[SuperWeight]:
        """What the guard and the ablation act on: the super weights; every candidate when
        nothing is measured (``verify=False``)."""
        return self.super_weights if self.verifier is not None else self.candidates

    @property
    def nonfinite_steps(self) -> int:
        """Recordings skipped because they held a NaN or infinite activation."""
        return self.nonfinite.count

    @property
    def recording(self) -> bool:
        """Whether a recorder is attached now."""
        return self._recorder is not None

    @property
    def recorder(self) -> Recorder | None:
        """The recorder attached now, if any."""
        return self._recorder

    @property
    def model(self) -> nn.Module | None:
        """The bound model (``None`` before :meth:`bind`)."""
        return self._model

    # -- the loop ------------------------------------------------------------------------
    def bind(self, model: nn.Module) -> MonitorSession:
        """Choose the modules to record in ``model`` and name known weights inside it.

        Raises ``ValueError`` (no down-projections, a known weight's module not found)
        before anything is attached. A model with no known module names and no Hugging
        Face config has its down-projections found by structure on the first recorded
        call instead (:mod:`sw_hooks.core.first_call`). Binding again (a second ``fit``)
        starts afresh, keeping the history.
        """
        self.stop()
        try:
            modules, experts = select_units(model, self._pattern, None)
        except ExampleInputNeeded:  # a hand-written model: found on its first recorded call
            modules, experts = None, {}
        self.tracker.qualify(model)
        self._model, self._modules, self._experts = model, modules, experts
        self._metric = None  # made at the first reduction, once the modules are known
        return self

    def hold_out(self, batch: Any, source: str = "first validation batch") -> None:
        """Measure candidates on ``batch``, unless a calibration batch was given."""
        if self.verifier is not None:
            self.verifier.hold_out(batch, source=source)

    def due(self, step: int) -> bool:
        """Whether ``step`` is on the schedule."""
        return step % self.every_n_steps == 0

    def start(self, step: int, *, always: bool = False) -> bool:
        """Attach a recorder if ``step`` is due (or ``always``); ``True`` while recording."""
        model = self._bound_model()
        if self._recorder is None and (always or self.due(step)):
            self._recorder = Recorder(
                model, self._modules, experts=self._experts, locations=self.locations
            )
            self.step = step
            if self.verifier is not None:
                self.verifier.capture_first_inputs(model, list(self._modules or ()))
        return self._recorder is not None

    def stop(self) -> dict[str, ChannelStats | ExpertStats]:
        """Remove the recorder (safe when none is attached); return what it recorded."""
        if self._recorder is None:
            return {}
        stats = self._recorder.all_stats
        if self._modules is None and self._recorder.module_names:
            self._modules = self._recorder.modules  # later recordings hook them directly
        self._recorder.remove()
        self._recorder.reset()
        self._recorder = None
        if self.verifier is not None:
            self.verifier.release()
        return stats

    def finish(self, stage: str = "train") -> Decision | None:
        """End the recording started by :meth:`start` and decide on it.

        ``None`` when nothing was being recorded (a step off the schedule) or nothing was
        called. A non-finite recording is skipped (``Decision.skipped``) or raises under
        ``strict``; the recorder is removed either way.
        """
        if self._recorder is None:
            return None
        return self.decide(self.stop(), stage=stage, step=self.step)

    def check(self, step: int, stage: str = "train") -> Decision | None:
        """Decide on what was recorded so far and keep recording (a fresh recording).

        For a loop that records continuously (:func:`watch`); ``None`` when nothing was
        recorded since the last check.
        """
        if self._recorder is None:
            return None
        stats = self._recorder.all_stats
        decided = self.decide(stats, stage=stage, step=step)
        self._recorder.reset()  # after the decision: what its measurement ran is not kept
        return decided

    def decide(
        self, stats: Mapping[str, ChannelStats | ExpertStats], *, stage: str, step: int
    ) -> Decision | None:
        """Reduce ``stats`` across processes (if asked), then fold them into the tracker.

        ``None`` when no process recorded anything. Experts are reduced as a whole
        (``[experts, C]`` maxima and routing counts), then read one routed expert a unit.
        """
        reduced = self._reduce(stats)
        if not reduced:
            return None
        decided = fold_recording(
            self.tracker,
            self._bound_model(),
            self._units(reduced),
            self.nonfinite,
            step=step,
            stage=stage,
            prefix=self.prefix,
            measure=self._measure,
        )
        if not decided.skipped:
            self.last_stats = reduced
        self.last_values = decided.values
        return decided

    # -- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``{"tracker", "last_values", "nonfinite_steps"}``: plain Python data."""
        return {
            "tracker": self.tracker.state_dict(),
            "last_values": dict(self.last_values),
            "nonfinite_steps": self.nonfinite.count,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a :meth:`state_dict`, or from a tracker's state with the count beside it.

        The second layout is what the Hugging Face callback saved before it used a
        session; both keep loading.
        """
        tracker_state = state["tracker"] if "tracker" in state else state
        self.tracker.load_state_dict(tracker_state)
        self.last_values = dict(state.get("last_values", {}))
        self.nonfinite.count = int(state.get("nonfinite_steps", 0))

    # -- helpers -------------------------------------------------------------------------
    def _measure(self, candidates: list[SuperWeight]) -> list[SuperWeight]:
        if self.verifier is None:
            return candidates
        self.verifier.release()  # the measurement's own forwards are not a batch to keep
        return self.verifier.measure(self._bound_model(), candidates)

    def _bound_model(self) -> nn.Module:
        if self._model is None:
            raise RuntimeError("MonitorSession has no model: call bind(model) first")
        return self._model

    def _make_metric(self, model: nn.Module) -> ChannelMax:
        return ChannelMax.for_units(
            model,
            self._modules or {},
            self._experts,
            sync_on_compute=True,
            process_group=self._process_group,
        )

    def _units(self, stats: Mapping[str, ChannelStats | ExpertStats]) -> dict[Unit, ChannelStats]:
        units: dict[Unit, ChannelStats] = {}
        for name, recorded in stats.items():
            if isinstance(recorded, ExpertStats):
                units |= self._experts[name].routed_units(recorded)
            else:
                units[Unit(name)] = recorded
        return units

    def _reduce(
        self, stats: Mapping[str, ChannelStats | ExpertStats]
    ) -> dict[str, ChannelStats | ExpertStats]:
        """Max over every process (a no-op on one), so all of them decide alike."""
        if not self._reduce_across:
            return dict(stats)
        if self._metric is None:
            # It moves to the recorded activations' device at its first update.
            self._metric = self._make_metric(self._bound_model())
        self._metric.update(stats)
        try:
            return self._metric.compute_stats()
        finally:
            self._metric.reset()


class SessionReadouts:
    """What a monitor adapter shows of its :class:`MonitorSession` (``self.session``): the
    tracker, its events and weights, the skipped recordings and the last recording's values.
    The Lightning and Hugging Face callbacks both read through it, so the two say the same."""

    session: MonitorSession

    @property
    def tracker(self) -> SpikeTracker:
        return self.session.tracker

    @property
    def events(self) -> list[WeightEvent]:
        return self.session.events

    @property
    def candidates(self) -> list[SuperWeight]:
        return self.session.candidates

    @property
    def super_weights(self) -> list[SuperWeight]:
        return self.session.super_weights

    @property
    def nonfinite_steps(self) -> int:
        """Recordings skipped because they held a NaN or infinite activation."""
        return self.session.nonfinite_steps

    @property
    def last_values(self) -> dict[str, float]:
        """The scalars of the last recording, as logged."""
        return self.session.last_values

    @property
    def last_stats(self) -> dict[str, ChannelStats | ExpertStats]:
        """The last finite recording, reduced across processes."""
        return self.session.last_stats


class Watch:
    """What :func:`watch` yields: the recorder while inside, the tracker and events after."""

    def __init__(self, session: MonitorSession) -> None:
        self.session = session
        self.model = session.model
        self.tracker = session.tracker
        self.recorder = session.recorder
        self.events: list[WeightEvent] = []
        self.values: dict[str, float] = {}

    @property
    def nonfinite_steps(self) -> int:
        """Checks skipped because the recording held a NaN or infinite activation."""
        return self.session.nonfinite_steps

    def check(self, step: int = 0, stage: str = "watch") -> list[WeightEvent]:
        """Decide on what was recorded so far, then start a fresh recording.

        A recording holding a NaN or infinite activation is skipped and counted (warned
        about once), or raises :class:`~sw_hooks.training.monitor.NonFiniteActivationError` under
        ``strict=True``.
        """
        decided = self.session.check(step, stage)
        if decided is None:
            return []
        self.values = decided.values
        self.events += decided.events
        return decided.events


@contextmanager
def watch(
    model: nn.Module,
    tracker: SpikeTracker | None = None,
    *,
    pattern: Any = None,
    step: int = 0,
    stage: str = "watch",
    strict: bool = False,
    verify: bool = True,
    calibration: Any = None,
) -> Iterator[Watch]:
    """Record the down-projections inside the block; on exit, fold the recording into ``tracker``.

    Works around anything that runs the model: ``generate``, evaluation, a training step.
    Call :meth:`Watch.check` inside the block to decide more often (every N steps). A
    recording with a NaN or infinite activation (an fp16 overflow) is skipped, counted
    in ``sw/nonfinite_steps`` and warned about once; ``strict=True`` raises
    :class:`~sw_hooks.training.monitor.NonFiniteActivationError` instead.

    Each new candidate is measured (``verify``) on ``calibration``, else on the first input
    the model ran on inside the block (a prompt of one token cannot be measured on: its
    candidates stay unmeasured).

    Example:
        >>> from sw_hooks.testing import planted_llama
        >>> planted = planted_llama()
        >>> with watch(planted.model, calibration=planted.calibration_ids()) as w, torch.no_grad():
        ...     _ = planted.model(planted.prompt())
        >>> [e.verdict for e in w.events], w.values["sw/watch/super_weights"]
        (['super', 'candidate'], 1.0)
    """
    session = MonitorSession(model, pattern, strict=strict, verify=verify, calibration=calibration)
    if tracker is not None:
        session.tracker = tracker
    session.start(step, always=True)
    watcher = Watch(session)
    try:
        yield watcher
        with torch.no_grad():
            watcher.check(step, stage)
    finally:
        session.stop()
