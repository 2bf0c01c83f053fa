"""The Lightning callback that keeps the optimizer from moving super weights."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from sw_hooks.core.access import Coordinate
from sw_hooks.core.results import SuperWeight
from sw_hooks.training.guard import GUARD_MODES, WeightGuard
from sw_hooks.training.lightning.monitor import SuperWeightMonitor
from sw_hooks.training.lightning.setup_checks import given_or_monitor

__all__ = ["SuperWeightGuard"]


class SuperWeightGuard(Callback):
    """Keep the optimizer from moving super weights while the rest of the model fine-tunes.

    ``mode="restore"`` (default) writes each guarded weight back after every optimizer
    step: exact with any optimizer, weight decay and momentum included. ``mode="freeze"``
    zeroes their gradient and per-element optimizer state before every step: exact with
    SGD, Adam, AdamW, RMSprop and Adagrad when ``weight_decay=0`` on those parameters, and
    refused at fit start otherwise (weight decay moves a weight whatever its gradient).

    Args:
        super_weights: what to guard; default: the super weights an attached
            :class:`SuperWeightMonitor` has verified (every candidate under its
            ``verify=False``), each guarded from the step after it was flagged, at its value then.
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
        self._weights, self._monitor = given_or_monitor(
            trainer, pl_module, self._given, type(self).__name__
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
            new = [w for w in self._monitor.session.targets if w.coordinate not in known]
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
