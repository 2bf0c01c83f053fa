"""Skip and count recordings that hold a NaN or infinite activation, so a run goes on.

An fp16 overflow makes one step's activations infinite; ``GradScaler`` skips that step's
update and training goes on, so the monitors skip that recording too
(:class:`NonFiniteSteps`), or raise :class:`NonFiniteActivationError` when made ``strict``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sw_hooks.training.tracker import Recording

Warn = Callable[[str], None]


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
        >>> from sw_hooks.core.record import ChannelStats, channel_maxima
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
