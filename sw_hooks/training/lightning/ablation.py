"""The Lightning callback that evaluates with the super weights masked, beside the plain model."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from sw_hooks.core.access import Coordinate
from sw_hooks.core.masks import WeightMask, ablate, scale
from sw_hooks.core.results import SuperWeight
from sw_hooks.training.lightning.monitor import SuperWeightMonitor
from sw_hooks.training.lightning.setup_checks import given_or_monitor

__all__ = ["SuperWeightAblation"]


class SuperWeightAblation(Callback):
    """Evaluate (validation and test) with the super weights zeroed or scaled, then restore them.

    With ``compare=False`` the whole evaluation runs on the masked model: what the
    ``LightningModule`` logs *is* the ablated metric. With ``compare=True`` (default) each
    batch is evaluated twice, as is and masked: every name the module logs appears also as
    ``<name>_ablated``, and at the end of the epoch ``<name>_ablated_delta`` (masked mean
    minus plain mean over batches). The weights are restored bit for bit after each masked
    batch or epoch, and on any exception.

    Args:
        super_weights: what to mask; default: the super weights an attached
            :class:`SuperWeightMonitor` has verified at the start of each evaluation (every
            candidate under its ``verify=False``).
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
        self._weights, self._monitor = given_or_monitor(
            trainer, pl_module, self._given, type(self).__name__
        )
        if self._given is not None:
            self._make_mask(pl_module)  # checks every coordinate now, touching nothing

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
            self._weights = self._monitor.session.targets
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
