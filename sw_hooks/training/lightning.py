"""Lightning callbacks: monitor, ablate and guard super weights during training.

Thin shells over the core: the monitoring loop (recording, the cross-rank reduction, the
decisions) is :class:`sw_hooks.training.session.MonitorSession`, the masks :mod:`sw_hooks.core.masks` and
the guard :class:`sw_hooks.training.guard.WeightGuard`. Nothing here needs a change to the user's
``LightningModule``.

Example:
    >>> trainer = lightning.Trainer(  # doctest: +SKIP
    ...     callbacks=[SuperWeightMonitor(), SuperWeightGuard(), SuperWeightAblation()]
    ... )
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
    SingleDeviceXLAStrategy,
    XLAStrategy,
)
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from sw_hooks.core.access import Coordinate
from sw_hooks.core.masks import WeightMask, ablate, scale
from sw_hooks.core.record import LOCATED_CHANNELS, ChannelStats, Locations
from sw_hooks.core.results import SuperWeight
from sw_hooks.training.guard import GUARD_MODES, WeightGuard
from sw_hooks.training.monitor import (
    WARNING_KINDS,
    Decision,
    NonFiniteWarning,
    SpikeTracker,
    WeightEvent,
    qualify,
)
from sw_hooks.training.session import MonitorSession

SUPPORTED_STRATEGIES = (SingleDeviceStrategy, DDPStrategy, ModelParallelStrategy)
# Subclasses of the supported ones whose parameters are not plain tensors or DTensors.
UNSUPPORTED_STRATEGIES = (DeepSpeedStrategy, FSDPStrategy, XLAStrategy, SingleDeviceXLAStrategy)

__all__ = ["SuperWeightAblation", "SuperWeightGuard", "SuperWeightMonitor"]


def check_strategy(trainer: pl.Trainer, owner: str) -> None:
    """Refuse strategies whose weights the callbacks cannot read or write element by element."""
    strategy = trainer.strategy
    if isinstance(strategy, UNSUPPORTED_STRATEGIES) or not isinstance(
        strategy, SUPPORTED_STRATEGIES
    ):
        raise MisconfigurationException(
            f"{owner} does not support the {type(strategy).__name__} strategy: it reads and "
            "writes single weight elements, which needs full weights (single device, DDP) or "
            "FSDP2 DTensor shards (ModelParallelStrategy). Under FSDP1 or DeepSpeed ZeRO-3 "
            "use the sw_hooks functions inside FullyShardedDataParallel.summon_full_params / "
            "deepspeed.zero.GatheredParameters instead."
        )


def qualified(pl_module: pl.LightningModule, weights: Iterable[Any], owner: str) -> list:
    """``weights`` renamed to full module names inside ``pl_module``, or a clear error."""
    try:
        return qualify(pl_module, weights)
    except (TypeError, ValueError) as error:
        raise MisconfigurationException(f"{owner}: {error}") from None


def find_monitor(trainer: pl.Trainer) -> SuperWeightMonitor | None:
    """The trainer's :class:`SuperWeightMonitor`, if one is attached."""
    return next((c for c in trainer.callbacks if isinstance(c, SuperWeightMonitor)), None)


class SuperWeightMonitor(Callback):
    """Record the down-projections on a schedule, flag super weights, and log what it sees.

    Every ``every_n_steps`` training steps (and over each validation epoch) it records the
    down-projections' per-channel max ``|input|``/``|output|``, reduces them across ranks
    with a max, and folds them into a :class:`~sw_hooks.training.monitor.SpikeTracker` (all of it
    one :class:`~sw_hooks.training.session.MonitorSession`; this callback only calls it): new spike
    pairs are flagged as they appear, known super weights when their super activation
    collapses or their value drifts. Each event is warned about (rank zero), logged, and
    kept in :attr:`events` and in checkpoints. Logged names are listed in
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
            )
        except ValueError as error:
            raise MisconfigurationException(f"SuperWeightMonitor: {error}") from None

    @property
    def every_n_steps(self) -> int:
        return self.session.every_n_steps

    @property
    def prefix(self) -> str:
        return self.session.prefix

    @property
    def tracker(self) -> SpikeTracker:
        return self.session.tracker

    @property
    def events(self) -> list[WeightEvent]:
        return self.session.events

    @property
    def nonfinite_steps(self) -> int:
        """Recordings skipped because they held a NaN or infinite activation."""
        return self.session.nonfinite_steps

    @property
    def super_weights(self) -> list[SuperWeight]:
        return self.session.super_weights

    @property
    def last_values(self) -> dict[str, float]:
        """The scalars of the last recording, as logged."""
        return self.session.last_values

    @property
    def last_stats(self) -> dict[str, ChannelStats]:
        """The last finite recording, reduced across ranks."""
        return self.session.last_stats

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
            say = rank_zero_warn if event.kind in WARNING_KINDS else rank_zero_info
            say(event.describe())
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(decided.values, step=self.session.step)


class SuperWeightAblation(Callback):
    """Evaluate (validation and test) with the super weights zeroed or scaled, then restore them.

    With ``compare=False`` the whole evaluation runs on the masked model: what the
    ``LightningModule`` logs *is* the ablated metric. With ``compare=True`` (default) each
    batch is evaluated twice, as is and masked: every name the module logs appears also as
    ``<name>_ablated``, and at the end of the epoch ``<name>_ablated_delta`` (masked mean
    minus plain mean over batches). The weights are restored bit for bit after each masked
    batch or epoch, and on any exception.

    Args:
        super_weights: what to mask; default: what an attached :class:`SuperWeightMonitor`
            knows at the start of each evaluation.
        factor: ``0.0`` zeroes the weights; any other value multiplies them.
        compare: evaluate both variants (twice the evaluation cost).
        suffix: appended to logged names for the masked variant.

    Example:
        >>> trainer = lightning.Trainer(  # doctest: +SKIP
        ...     callbacks=[SuperWeightAblation([("model.layers.11.mlp.down_proj", 507, 1229)])]
        ... )
        >>> trainer.validate(module)  # logs val_loss, val_loss_ablated, val_loss_ablated_delta
    """

    def __init__(
        self,
        super_weights: Iterable[SuperWeight | Coordinate] | None = None,
        *,
        factor: float = 0.0,
        compare: bool = True,
        suffix: str = "_ablated",
    ) -> None:
        self._given = None if super_weights is None else list(super_weights)
        self.factor = factor
        self.compare = compare
        self.suffix = suffix
        self._weights: list[SuperWeight] = []
        self._monitor: SuperWeightMonitor | None = None
        self._mask: WeightMask | None = None
        self._logged: dict[str, dict[str, list[float]]] = {}

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer, type(self).__name__)
        self._monitor = find_monitor(trainer)
        if self._given is not None:
            self._weights = qualified(pl_module, self._given, type(self).__name__)
            self._make_mask(pl_module)  # checks every coordinate now, touching nothing
        elif self._monitor is None:
            raise MisconfigurationException(
                "SuperWeightAblation has no super weights: pass super_weights=[...] or attach "
                "a SuperWeightMonitor to the same Trainer"
            )

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._begin(trainer, pl_module)

    @override
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # fmt: skip
        self._rerun(trainer, pl_module, pl_module.validation_step, batch, batch_idx, dataloader_idx)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end(pl_module)

    @override
    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._begin(trainer, pl_module)

    @override
    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # fmt: skip
        self._rerun(trainer, pl_module, pl_module.test_step, batch, batch_idx, dataloader_idx)

    @override
    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end(pl_module)

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._release(pl_module)

    # -- the work ------------------------------------------------------------------------
    def _make_mask(self, pl_module: pl.LightningModule) -> WeightMask:
        if self.factor == 0.0:
            return ablate(pl_module, self._weights)
        return scale(pl_module, self._weights, self.factor)

    def _begin(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._given is None and self._monitor is not None:
            self._weights = self._monitor.super_weights
        if not self._weights or trainer.sanity_checking:
            return
        if self.compare:
            self._logged = {"plain": {}, "masked": {}}
            self._patch_log(pl_module)
        else:
            self._mask = self._make_mask(pl_module).apply()

    def _rerun(
        self, trainer, pl_module, step_fn, batch, batch_idx: int, dataloader_idx: int
    ) -> None:
        if not self._logged or trainer.sanity_checking:
            return
        extra = (dataloader_idx,) if _takes_dataloader_idx(step_fn) else ()
        with self._make_mask(pl_module), self._logging("masked"):
            step_fn(batch, batch_idx, *extra)

    def _end(self, pl_module: pl.LightningModule) -> None:
        logged = self._logged
        self._release(pl_module)
        for name, masked in logged.get("masked", {}).items():
            plain = logged["plain"].get(name)
            if plain:
                delta = _mean(masked) - _mean(plain)
                pl_module.log(f"{name}{self.suffix}_delta", delta, sync_dist=True)

    def _release(self, pl_module: pl.LightningModule) -> None:
        if self._mask is not None:
            self._mask.restore()
            self._mask = None
        if "log" in vars(pl_module):
            del pl_module.log  # back to the class's own method
        self._logged = {}
        self._variant = "plain"

    def _patch_log(self, pl_module: pl.LightningModule) -> None:
        """Wrap ``pl_module.log`` so each logged value is also kept, per variant."""
        original = pl_module.log
        self._variant = "plain"

        def log(name: str, value: Any, *args: Any, **kwargs: Any) -> None:
            self._logged[self._variant].setdefault(name, []).append(float(value))
            suffix = self.suffix if self._variant == "masked" else ""
            original(f"{name}{suffix}", value, *args, **kwargs)

        pl_module.log = log  # type: ignore[method-assign]

    @contextmanager
    def _logging(self, variant: str) -> Iterator[None]:
        self._variant = variant
        try:
            yield
        finally:
            self._variant = "plain"


def _takes_dataloader_idx(step_fn: Any) -> bool:
    parameters = inspect.signature(step_fn).parameters
    return "dataloader_idx" in parameters or len(parameters) >= 3


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


class SuperWeightGuard(Callback):
    """Keep the optimizer from moving super weights while the rest of the model fine-tunes.

    ``mode="restore"`` (default) writes each guarded weight back after every optimizer
    step: exact with any optimizer, weight decay and momentum included. ``mode="freeze"``
    zeroes their gradient and per-element optimizer state before every step: exact with
    SGD, Adam, AdamW, RMSprop and Adagrad when ``weight_decay=0`` on those parameters, and
    refused at fit start otherwise (weight decay moves a weight whatever its gradient).

    Args:
        super_weights: what to guard; default: what an attached :class:`SuperWeightMonitor`
            flags, guarded from the step after it is flagged, at its value then.
        mode: ``"restore"`` or ``"freeze"``.

    Example:
        >>> guard = SuperWeightGuard([("model.layers.11.mlp.down_proj", 507, 1229)])  # doctest: +SKIP
        >>> lightning.Trainer(callbacks=[guard]).fit(module)  # doctest: +SKIP
    """

    def __init__(
        self,
        super_weights: Iterable[SuperWeight | Coordinate] | None = None,
        *,
        mode: str = "restore",
    ) -> None:
        if mode not in GUARD_MODES:
            raise MisconfigurationException(
                f"guard mode must be one of {GUARD_MODES}, got {mode!r}"
            )
        self.mode = mode
        self._given = None if super_weights is None else list(super_weights)
        self._weights: list[SuperWeight] = []
        self._guards: list[WeightGuard] = []
        self._guarded: list[tuple[str, int, int]] = []
        self._given_from_state: list[tuple[str, int, int]] = []
        self._monitor: SuperWeightMonitor | None = None

    @property
    def guarded(self) -> list[tuple[str, int, int]]:
        """Every coordinate guarded in this run (kept after the guard is released)."""
        return list(self._guarded)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer, type(self).__name__)
        self._monitor = find_monitor(trainer)
        if self._given is not None:
            self._weights = qualified(pl_module, self._given, type(self).__name__)
        elif self._monitor is None:
            raise MisconfigurationException(
                "SuperWeightGuard has no super weights: pass super_weights=[...] or attach "
                "a SuperWeightMonitor to the same Trainer"
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._guard(trainer, pl_module, self._weights)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._given is None and self._monitor is not None:
            known = set(self._guarded)
            new = [w for w in self._monitor.super_weights if w.coordinate not in known]
            self._guard(trainer, pl_module, new)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        # Lightning computes the gradient inside optimizer.step(closure); this hook runs
        # after that backward (and the DDP all-reduce), before the update.
        if self.mode == "freeze":
            for guard in self._guards:
                guard.mask_gradients(optimizer)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._release()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._release()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "guarded": [list(c) for c in self.guarded]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._given is None:
            self._given_from_state = [tuple(c) for c in state_dict["guarded"]]

    def _guard(self, trainer: pl.Trainer, pl_module: pl.LightningModule, weights: list) -> None:
        weights = list(weights) + self._given_from_state
        self._given_from_state = []
        if not weights:
            return
        try:
            guard = WeightGuard(pl_module, weights, self.mode)
            guard.attach(*trainer.optimizers, freeze_before_step=False)
        except ValueError as error:
            raise MisconfigurationException(f"SuperWeightGuard: {error}") from None
        self._guards.append(guard)
        self._guarded += guard.coordinates

    def _release(self) -> None:
        while self._guards:
            self._guards.pop().detach()
