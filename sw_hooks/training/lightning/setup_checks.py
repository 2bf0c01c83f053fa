"""The checks every super-weight callback runs once, in ``setup``: strategy, coordinates, and
where the weights come from (given, or the Trainer's monitor)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
    SingleDeviceXLAStrategy,
    XLAStrategy,
)
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from sw_hooks.training.tracker import qualify

SUPPORTED_STRATEGIES = (SingleDeviceStrategy, DDPStrategy, ModelParallelStrategy)
# Subclasses of the supported ones whose parameters are not plain tensors or DTensors.
UNSUPPORTED_STRATEGIES = (DeepSpeedStrategy, FSDPStrategy, XLAStrategy, SingleDeviceXLAStrategy)


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


def given_or_monitor(
    trainer: pl.Trainer, pl_module: pl.LightningModule, given: Iterable[Any] | None, owner: str
) -> tuple[list, Any]:
    """The ``setup`` of a callback acting on super weights (the guard, the ablation).

    Checks the strategy, then returns ``(the given weights qualified in pl_module, the
    Trainer's SuperWeightMonitor or None)``; with no weights given, the monitor must be
    there to find them.
    """
    from sw_hooks.training.lightning.monitor import find_monitor  # it imports this module

    check_strategy(trainer, owner)
    monitor = find_monitor(trainer)
    if given is not None:
        return qualified(pl_module, given, owner), monitor
    if monitor is None:
        raise MisconfigurationException(
            f"{owner} has no super weights: pass super_weights=[...] or attach a "
            "SuperWeightMonitor to the same Trainer"
        )
    return [], monitor
