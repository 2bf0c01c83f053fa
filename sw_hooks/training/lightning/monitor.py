"""The Lightning callback that records the down-projections, verifies candidate super weights
and flags them as they move."""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from sw_hooks.analysis.verify import VerifySettings
from sw_hooks.core.access import Coordinate
from sw_hooks.core.record import LOCATED_CHANNELS, Locations
from sw_hooks.core.results import SuperWeight
from sw_hooks.training.lightning.setup_checks import check_strategy
from sw_hooks.training.monitor import Decision, NonFiniteWarning
from sw_hooks.training.session import MonitorSession, SessionReadouts

__all__ = ["SuperWeightMonitor", "find_monitor"]


class SuperWeightMonitor(SessionReadouts, Callback):
    """Record the down-projections on a schedule, flag super weights, and log what it sees.

    Every ``every_n_steps`` training steps (and over each validation epoch) it records the
    down-projections' per-channel max ``|input|``/``|output|``, reduces them across ranks
    with a max, and folds them into a :class:`~sw_hooks.training.monitor.SpikeTracker` (all of it
    one :class:`~sw_hooks.training.session.MonitorSession`; this callback only calls it): new spike
    pairs are flagged as candidates as they appear, tracked weights when their super activation
    collapses or their value drifts. Each new candidate is measured once (``verify``): its
    perplexity ratio when zeroed, on the ``calibration`` batch or else the first validation
    batch (else the first training batch); :attr:`super_weights` are those that reach
    ``verify_settings.min_impact``, and the guard and the ablation act on them. Each event
    (with the impact and verdict) is logged, kept in :attr:`events` and in checkpoints (a
    resumed run does not measure again), and said on rank zero: a warning for a collapse,
    drift or new candidate that is not measured harmless. Logged names are listed in
    :func:`sw_hooks.training.monitor.metric_values` (``sw/train/layer_3/output_max``,
    ``sw/val/layer_1.row_5.col_17/activation``, ``sw/events/collapsed``...).

    A recording holding a NaN or infinite activation (an fp16 overflow that ``GradScaler``
    skips) is skipped too: warned about once on rank zero, counted in
    ``sw/nonfinite_steps``, and training goes on.

    Args:
        every_n_steps: record one training step out of this many (``1``: every step).
        record_validation: also record over each validation epoch (stage ``val``).
        super_weights: weights to watch from the start (coordinates relative to the
            ``LightningModule`` or to the model it holds); others are found on the fly.
        pattern: where the down-projections are, for unknown architectures.
        collapse_factor, drift_fraction, spike_options: see
            :class:`~sw_hooks.training.monitor.SpikeTracker`.
        prefix: the first component of every logged name.
        require_logger: refuse a trainer without loggers (``False`` keeps only warnings
            and state).
        record_locations: which channels keep the token position of their maximum, as
            ``record(locations=...)``: the 32 largest of each recording by default,
            ``True`` every channel, ``False`` none (magnitudes only, positions -1).
        strict: raise :class:`~sw_hooks.training.monitor.NonFiniteActivationError` on a non-finite
            activation instead of skipping that recording.
        verify: measure each new candidate (``False``: measure nothing; the guard and the
            ablation then act on every candidate, as before verification existed).
        calibration: the held-out batch to measure on (token ids, a dict with
            ``input_ids``, or a tuple starting with them).
        verify_settings: the measurement's threshold and window.

    Example:
        >>> monitor = SuperWeightMonitor(every_n_steps=10)  # doctest: +SKIP
        >>> lightning.Trainer(callbacks=[monitor]).fit(module)  # doctest: +SKIP
        >>> [e.describe() for e in monitor.events]  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        every_n_steps: int = 50,
        record_validation: bool = True,
        super_weights: Iterable[SuperWeight | Coordinate] = (),
        pattern: Any = None,
        collapse_factor: float = 10.0,
        drift_fraction: float = 0.5,
        spike_options: dict[str, Any] | None = None,
        prefix: str = "sw",
        require_logger: bool = True,
        record_locations: Locations = LOCATED_CHANNELS,
        strict: bool = False,
        verify: bool = True,
        calibration: Any = None,
        verify_settings: VerifySettings | None = None,
    ) -> None:
        self.record_validation = record_validation
        self.require_logger = require_logger
        try:
            self.session = MonitorSession(
                pattern=pattern,
                every_n_steps=every_n_steps,
                super_weights=super_weights,
                collapse_factor=collapse_factor,
                drift_fraction=drift_fraction,
                spike_options=spike_options,
                prefix=prefix,
                strict=strict,
                warn=partial(rank_zero_warn, category=NonFiniteWarning),
                locations=record_locations,
                reduce_across_processes=True,
                verify=verify,
                calibration=calibration,
                verify_settings=verify_settings,
            )
        except (TypeError, ValueError) as error:
            raise MisconfigurationException(f"SuperWeightMonitor: {error}") from None

    @property
    def every_n_steps(self) -> int:
        return self.session.every_n_steps

    @property
    def prefix(self) -> str:
        return self.session.prefix

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, prefix=self.prefix)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer, type(self).__name__)
        if self.require_logger and not trainer.loggers:
            raise MisconfigurationException(
                "SuperWeightMonitor logs through the Trainer's loggers, but it has none: "
                "pass logger=CSVLogger(...) (or any logger), or require_logger=False"
            )
        try:
            self.session.bind(pl_module)
        except ValueError as error:
            raise MisconfigurationException(f"SuperWeightMonitor: {error}") from None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        batch = first_validation_batch(trainer)
        if batch is not None:
            self.session.hold_out(batch)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.session.start(trainer.global_step)

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._report(trainer, self.session.finish("train"))

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.record_validation and not trainer.sanity_checking:
            self.session.start(trainer.global_step, always=True)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._report(trainer, self.session.finish("val"))

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self.session.stop()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.session.stop()

    @override
    def state_dict(self) -> dict[str, Any]:
        return self.session.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.session.load_state_dict(state_dict)

    def _report(self, trainer: pl.Trainer, decided: Decision | None) -> None:
        """Warn (rank zero) about each event and log the values (rank zero's loggers)."""
        if decided is None:
            return
        for event in decided.events:
            say = rank_zero_warn if event.alarming else rank_zero_info
            say(event.describe())
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(decided.values, step=self.session.step)


def first_validation_batch(trainer: pl.Trainer) -> Any:
    """The first batch of the (first) validation dataloader of ``fit``, or ``None``.

    Lightning builds the validation dataloaders lazily; asking the loop to build them now
    is what it does itself before the first validation, and it does not build them twice.
    """
    loop = trainer.fit_loop.epoch_loop.val_loop
    defined = loop._data_source.is_defined()  # a dataloader given to fit, or val_dataloader()
    if trainer.val_dataloaders is None and trainer.limit_val_batches and defined:
        loop.setup_data()
    loaders = trainer.val_dataloaders
    if isinstance(loaders, list | tuple):
        loaders = loaders[0] if loaders else None
    if loaders is None:
        return None
    return next(iter(loaders), None)


def find_monitor(trainer: pl.Trainer) -> SuperWeightMonitor | None:
    """The trainer's :class:`SuperWeightMonitor`, if one is attached."""
    return next((c for c in trainer.callbacks if isinstance(c, SuperWeightMonitor)), None)
