"""Lightning callbacks: monitor, ablate and guard super weights during training.

Thin shells over the core: the monitoring loop (recording, the cross-rank reduction, the
decisions) is :class:`sw_hooks.training.session.MonitorSession`, the masks :mod:`sw_hooks.core.masks` and
the guard :class:`sw_hooks.training.guard.WeightGuard`. Nothing here needs a change to the user's
``LightningModule``. One callback a module: :mod:`.monitor`, :mod:`.guard`, :mod:`.ablation`;
the checks they share at ``setup`` are in :mod:`.setup_checks`.

Example:
    >>> trainer = lightning.Trainer(  # doctest: +SKIP
    ...     callbacks=[SuperWeightMonitor(), SuperWeightGuard(), SuperWeightAblation()]
    ... )
"""

from sw_hooks.training.lightning.ablation import SuperWeightAblation
from sw_hooks.training.lightning.guard import SuperWeightGuard
from sw_hooks.training.lightning.monitor import SuperWeightMonitor

__all__ = ["SuperWeightAblation", "SuperWeightGuard", "SuperWeightMonitor"]
