"""Hugging Face ``Trainer`` glue: the super-weight monitor and guard as a ``TrainerCallback``.

The monitoring loop is :class:`sw_hooks.training.session.MonitorSession`, the guard
:class:`sw_hooks.training.guard.WeightGuard`; this file only wires them to the ``Trainer``'s
events. :func:`watch` (re-exported from :mod:`sw_hooks.training.session`) is the same monitor as a
context manager, for ``model.generate(...)`` or a hand-written loop.

Example:
    >>> from transformers import Trainer  # doctest: +SKIP
    >>> callback = SuperWeightCallback(every_n_steps=10, guard="restore")  # doctest: +SKIP
    >>> Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()  # doctest: +SKIP
    >>> with watch(model) as seen:  # doctest: +SKIP
    ...     model.generate(ids, max_new_tokens=20)
    >>> seen.events  # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from sw_hooks.analysis.verify import VerifySettings
from sw_hooks.core.access import Coordinate
from sw_hooks.core.results import SuperWeight
from sw_hooks.training.guard import GUARD_MODES, WeightGuard
from sw_hooks.training.monitor import Decision, NonFiniteWarning
from sw_hooks.training.session import MonitorSession, SessionReadouts, watch

__all__ = ["SuperWeightCallback", "watch"]


class SuperWeightCallback(SessionReadouts, TrainerCallback):
    """Monitor (and optionally guard) super weights while a Hugging Face ``Trainer`` trains.

    Every ``every_n_steps`` optimizer steps it records the down-projections over that
    step's micro-batches, reduces the maxima across processes (max), folds them into a
    :class:`~sw_hooks.training.monitor.SpikeTracker`, measures each new candidate once (its
    perplexity ratio when zeroed, on ``calibration`` or else the first evaluation batch, else
    the first training batch) and warns about each new, collapsed or drifted weight not
    measured harmless. The scalars (names as in :func:`~sw_hooks.training.monitor.metric_values`) are
    appended to ``state.log_history`` on the main process (saved in ``trainer_state.json``)
    and kept in :attr:`last_values`. A recording holding a NaN or infinite activation (an
    fp16 overflow) is skipped, warned about once and counted in ``sw/nonfinite_steps``.

    Args:
        super_weights: weights known in advance; others are found on the fly.
        every_n_steps: record one optimizer step out of this many.
        guard: ``None``, ``"restore"`` or ``"freeze"`` (see :mod:`sw_hooks.training.guard`); guards
            ``super_weights``, or if none were given the super weights verified at the first
            recording that finds any (every candidate under ``verify=False``).
        pattern, collapse_factor, drift_fraction, spike_options, prefix, strict, verify, calibration, verify_settings: as
            for :class:`sw_hooks.training.lightning.SuperWeightMonitor`.
    """

    def __init__(
        self,
        super_weights: Iterable[SuperWeight | Coordinate] = (),
        *,
        every_n_steps: int = 50,
        guard: str | None = None,
        pattern: Any = None,
        collapse_factor: float = 10.0,
        drift_fraction: float = 0.5,
        spike_options: dict[str, Any] | None = None,
        prefix: str = "sw",
        strict: bool = False,
        verify: bool = True,
        calibration: Any = None,
        verify_settings: VerifySettings | None = None,
    ) -> None:
        if guard is not None and guard not in GUARD_MODES:
            raise ValueError(f"guard must be None or one of {GUARD_MODES}, got {guard!r}")
        self.guard_mode = guard
        self.guard: WeightGuard | None = None
        self._main = True
        self._model: nn.Module | None = None
        self._optimizer: Any = None
        self.session = MonitorSession(
            pattern=pattern,
            every_n_steps=every_n_steps,
            super_weights=super_weights,
            collapse_factor=collapse_factor,
            drift_fraction=drift_fraction,
            spike_options=spike_options,
            prefix=prefix,
            strict=strict,
            warn=self._warn_on_main,
            reduce_across_processes=True,
            verify=verify,
            calibration=calibration,
            verify_settings=verify_settings,
        )

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: nn.Module | None = None, optimizer: Any = None, **kwargs: Any) -> None:  # fmt: skip
        self._model, self._optimizer = model, getattr(optimizer, "optimizer", optimizer)
        self._main = state.is_world_process_zero
        self.session.bind(model)  # a clear ValueError if there are no down-projections
        evaluation = kwargs.get("eval_dataloader")
        if evaluation is not None:
            self.session.hold_out(next(iter(evaluation)), "first evaluation batch")
        self._guard(self.session.targets)

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:  # fmt: skip
        self.session.start(state.global_step)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:  # fmt: skip
        decided = self.session.finish("train")
        if decided is None:
            return
        self._report(state, decided)
        if self.guard is None:
            self._guard(self.session.targets)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:  # fmt: skip
        self.session.stop()
        if self.guard is not None:
            self.guard.detach()

    def state_dict(self) -> dict[str, Any]:
        """The session's history (tracker, skipped-step count, last values), for a checkpoint."""
        return self.session.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`, or from the flat layout saved by earlier versions."""
        self.session.load_state_dict(state)

    def _guard(self, weights: list[SuperWeight]) -> None:
        if self.guard_mode is None or not weights or self._optimizer is None:
            return
        self.guard = WeightGuard(self._model, weights, self.guard_mode).attach(self._optimizer)

    def _warn_on_main(self, message: str) -> None:
        if self._main:
            warnings.warn(message, NonFiniteWarning, stacklevel=2)

    def _report(self, state: TrainerState, decided: Decision) -> None:
        if not state.is_world_process_zero:
            return
        for event in decided.events:
            if event.alarming:
                warnings.warn(event.describe(), stacklevel=2)
        state.log_history.append({**decided.values, "step": self.session.step})
