"""Super weights in a Lightning ``Trainer``: monitor, guard and ablate them while it trains.

The three callbacks need no change to the ``LightningModule``; give them to the ``Trainer``:

- :class:`SuperWeightMonitor` records the down-projections on a schedule, reduces the
  maxima across ranks, flags candidates as they appear, collapse or drift, measures each
  new candidate once (only those it measures super are super weights), and logs it;
- :class:`SuperWeightGuard` keeps the super weights from moving (``"restore"`` or
  ``"freeze"``), those given or those the monitor verified;
- :class:`SuperWeightAblation` zeroes (or scales) them for a stage, to measure their role.

:func:`watch` is the same monitor as a context manager (around ``generate`` or a
hand-written loop), and :func:`guard` the same guard for a plain optimizer. Each lives in
its own module under :mod:`sw_hooks.training`; this is the short path to them.

Example:
    >>> import lightning  # doctest: +SKIP
    >>> from sw_hooks.lightning import SuperWeightGuard, SuperWeightMonitor
    >>> monitor = SuperWeightMonitor(every_n_steps=10)
    >>> trainer = lightning.Trainer(callbacks=[monitor, SuperWeightGuard()])  # doctest: +SKIP
    >>> trainer.fit(module)  # doctest: +SKIP
    >>> monitor.events  # doctest: +SKIP
"""

from sw_hooks.training.guard import guard
from sw_hooks.training.lightning.ablation import SuperWeightAblation
from sw_hooks.training.lightning.guard import SuperWeightGuard
from sw_hooks.training.lightning.monitor import SuperWeightMonitor
from sw_hooks.training.session import watch

__all__ = ["SuperWeightAblation", "SuperWeightGuard", "SuperWeightMonitor", "guard", "watch"]
