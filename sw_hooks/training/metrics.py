"""``ChannelMax``: per-channel max ``|activation|`` per module as a torchmetrics ``Metric``.

The recorder (:mod:`sw_hooks.core.record`) folds activations into running maxima inside one
process. ``ChannelMax`` holds the same maxima as metric states so that torchmetrics can
reduce them across processes: with ``dist_reduce_fx="max"`` every rank ends up with the
maxima of all the data, never a mean of per-rank maxima (a mean would shrink a spike seen
by one rank only).

Where a maximum happened (signed value, token position, batch index) rides along in a
second state per side, ``[4, C]`` float64 rows ``(abs_max, value, token, batch)``, reduced
by :func:`keep_largest`: each channel keeps the row of the rank holding its largest value
(the lowest rank on ties, as :func:`~sw_hooks.core.record.merge_channel_maxima` does), so every
rank computes the same locations.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any

import torch
from torch import nn
from torchmetrics import Metric

from sw_hooks.core.access import oriented_shape
from sw_hooks.core.experts import ExpertsModule
from sw_hooks.core.locate import find_down_projections
from sw_hooks.core.maxima import beats
from sw_hooks.core.record import (
    ChannelMaxima,
    ChannelStats,
    ExpertStats,
    Recorder,
    select_units,
    stats_from_state_dict,
    stats_to_state_dict,
)

_SIDES = ("input", "output")


def empty_where(channels: int) -> torch.Tensor:
    """The ``[4, C]`` location state before any update: ``abs_max`` and location ``-1``.

    ``|x|`` is never negative, so an ``abs_max`` row of ``-1`` means "never recorded" and
    loses to any recording, here and in :func:`keep_largest` across ranks.
    """
    where = torch.full((4, channels), -1.0, dtype=torch.float64)
    where[1] = 0.0
    return where


def maxima_to_where(maxima: ChannelMaxima) -> torch.Tensor:
    """Pack :class:`ChannelMaxima` into the ``[4, C]`` float64 location state."""
    return torch.stack([maxima.abs_max, maxima.value, maxima.token, maxima.batch]).to(torch.float64)


def where_to_maxima(where: torch.Tensor) -> ChannelMaxima:
    """Unpack a ``[4, C]`` location state (inverse of :func:`maxima_to_where`)."""
    return ChannelMaxima(where[0].float(), where[1].float(), where[2].long(), where[3].long())


def merge_where(current: torch.Tensor, incoming: torch.Tensor) -> torch.Tensor:
    """Per channel, keep the column whose ``abs_max`` wins by :func:`~sw_hooks.core.maxima.beats`
    (larger, or NaN; ``current`` on ties), the rule of every merge of maxima.

    Example:
        >>> a = torch.tensor([[1.0, 5.0], [1.0, -5.0], [0.0, 2.0], [0.0, 0.0]])
        >>> b = torch.tensor([[3.0, 4.0], [-3.0, 4.0], [7.0, 1.0], [1.0, 1.0]])
        >>> merge_where(a, b)[1].tolist()
        [-3.0, -5.0]
    """
    incoming = incoming.to(current.device)
    return torch.where(beats(incoming[0], current[0]), incoming, current)


def keep_largest(stacked: torch.Tensor) -> torch.Tensor:
    """Reduce gathered location states ``[ranks, 4, C]`` to ``[4, C]``, the largest per channel.

    ``argmax`` returns the first maximum, so the lowest rank wins ties on every rank alike.
    """
    if stacked.dim() == 2:  # a single process: nothing was gathered
        return stacked
    winner = stacked[:, 0, :].argmax(dim=0)
    return stacked.gather(0, winner.expand(1, stacked.shape[1], -1)).squeeze(0)


def stats_device(stats: Mapping[str, ChannelStats]) -> torch.device | None:
    """The device of the first recorded side in ``stats`` (``None`` when nothing was recorded)."""
    for module_stats in stats.values():
        for side in _SIDES:
            maxima = getattr(module_stats, side)
            if maxima is not None:
                return maxima.abs_max.device
    return None


def module_channels(model: nn.Module, modules: Mapping[str, nn.Module] | None = None):
    """``{name: (in_channels, out_channels)}`` of the down-projections (or given modules)."""
    chosen = find_down_projections(model) if modules is None else modules
    return {name: tuple(reversed(oriented_shape(module))) for name, module in chosen.items()}


class ChannelMax(Metric):
    """Per-channel max ``|input|`` and ``|output|`` per module, reduced by max across ranks.

    Feed it recorder stats (``{module: ChannelStats}``) or a :class:`~sw_hooks.core.record.Recorder`;
    :meth:`compute_stats` gives ``{module: ChannelStats}`` over everything seen by every rank.
    The states move to the device of the first update's stats (where the activations were
    recorded), so a cross-rank reduction runs on the data's device (CUDA tensors for NCCL)
    whatever device the metric was made on.

    Experts modules (``experts={name: number of experts}``) are reduced the same way: their
    ``[experts, C]`` maxima are flattened into the states, and their routing counts summed;
    :meth:`compute_stats` gives them back as :class:`~sw_hooks.core.record.ExpertStats`.

    Args:
        channels: ``{module_name: (in_channels, out_channels)}``; see :meth:`for_model`. For
            an experts module, one expert's channels.
        experts: ``{experts module name: number of experts}`` for the names that are experts.
        kwargs: passed to :class:`torchmetrics.Metric` (``process_group``, ``sync_on_compute``...).

    Example:
        >>> from sw_hooks.core.record import record
        >>> from sw_hooks.testing import planted_llama
        >>> planted = planted_llama()
        >>> metric = ChannelMax.for_model(planted.model)
        >>> with record(planted.model) as rec, torch.no_grad():
        ...     _ = planted.model(planted.prompt())
        >>> metric.update(rec)
        >>> metric.compute_stats()["model.layers.1.mlp.down_proj"].output.top()[0]
        5
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(
        self,
        channels: Mapping[str, tuple[int, int]],
        *,
        experts: Mapping[str, int] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not channels:
            raise ValueError("ChannelMax needs at least one module")
        self.module_names: tuple[str, ...] = tuple(channels)
        self.experts: dict[str, int] = dict(experts or {})
        for index, (name, sizes) in enumerate(channels.items()):
            count = self.experts.get(name, 1)
            for side, size in zip(_SIDES, sizes, strict=True):
                self.add_state(f"{side}_abs_max_{index}", torch.zeros(count * size), "max")
                self.add_state(f"{side}_where_{index}", empty_where(count * size), keep_largest)
            self.add_state(f"calls_{index}", torch.tensor(0), "sum")
            if name in self.experts:
                self.add_state(f"tokens_{index}", torch.zeros(count, dtype=torch.long), "sum")
        self._holds_data = False

    @classmethod
    def for_model(cls, model: nn.Module, pattern: Any = None, **kwargs: Any) -> ChannelMax:
        """A metric sized for what :func:`~sw_hooks.core.record.record` records in ``model``
        (``pattern`` as its ``modules``): the down-projections and the experts."""
        return cls.for_units(model, *select_units(model, pattern, None), **kwargs)

    @classmethod
    def for_units(
        cls,
        model: nn.Module,
        modules: Mapping[str, nn.Module],
        experts: Mapping[str, ExpertsModule],
        **kwargs: Any,
    ) -> ChannelMax:
        """A metric sized for these dense modules and experts modules."""
        channels = module_channels(model, modules)
        channels |= {name: unit.channels() for name, unit in experts.items()}
        counts = {name: unit.num_experts for name, unit in experts.items()}
        return cls(channels, experts=counts, **kwargs)

    def update(self, stats: Mapping[str, ChannelStats | ExpertStats] | Recorder) -> None:
        """Fold recorder stats in (elementwise max); unknown module names raise."""
        incoming = stats.all_stats if isinstance(stats, Recorder) else stats
        if not self._holds_data:
            self._move_to_data(incoming)
            self._holds_data = bool(incoming)
        for name, module_stats in incoming.items():
            index = self._index(name)
            for side in _SIDES:
                self._fold(f"{side}_{{}}_{index}", _flat(getattr(module_stats, side)))
            calls = getattr(self, f"calls_{index}")
            setattr(self, f"calls_{index}", calls + module_stats.calls)
            if isinstance(module_stats, ExpertStats):
                tokens = getattr(self, f"tokens_{index}")
                setattr(self, f"tokens_{index}", tokens + module_stats.tokens.to(tokens.device))

    def reset(self) -> None:
        """Back to the empty state; the next update's stats choose the device again."""
        super().reset()
        self._holds_data = False

    def compute(self) -> dict[str, torch.Tensor]:
        """The reduced maxima as a flat tensor dict (the recorder's ``state_dict`` layout).

        torchmetrics post-processes what ``compute`` returns as a collection of tensors;
        :meth:`compute_stats` gives the same as ``{module: ChannelStats}``.
        """
        return stats_to_state_dict(self._stats())

    def compute_stats(self) -> dict[str, ChannelStats | ExpertStats]:
        """``{module: ChannelStats}`` over every rank; modules never recorded are left out."""
        return stats_from_state_dict(self.compute())

    def _stats(self) -> dict[str, ChannelStats | ExpertStats]:
        result: dict[str, ChannelStats | ExpertStats] = {}
        for index, name in enumerate(self.module_names):
            calls = int(getattr(self, f"calls_{index}"))
            if not calls:
                continue
            sides = [self._maxima(side, index) for side in _SIDES]
            if name in self.experts:
                count = self.experts[name]
                stacked = [_stacked(maxima, count) for maxima in sides]
                result[name] = ExpertStats(*stacked, getattr(self, f"tokens_{index}").cpu(), calls)
            else:
                result[name] = ChannelStats(*sides, calls)
        return result

    def _move_to_data(self, incoming: Mapping[str, ChannelStats]) -> None:
        """Move the states (and their reset values) to the device the stats are on."""
        device = stats_device(incoming)
        if device is not None and device != self.device:
            self.to(device)

    def _index(self, name: str) -> int:
        try:
            return self.module_names.index(name)
        except ValueError:
            raise ValueError(f"ChannelMax does not track module {name!r}") from None

    def _fold(self, key: str, maxima: ChannelMaxima | None) -> None:
        if maxima is None:
            return
        abs_key, where_key = key.format("abs_max"), key.format("where")
        current = getattr(self, abs_key)
        setattr(self, abs_key, torch.maximum(current, maxima.abs_max.to(current.device)))
        setattr(self, where_key, merge_where(getattr(self, where_key), maxima_to_where(maxima)))

    def _maxima(self, side: str, index: int) -> ChannelMaxima | None:
        where = getattr(self, f"{side}_where_{index}")
        if bool((where[0] < 0).all()):
            return None  # this side was never recorded (|x| is never negative once it is)
        located = where_to_maxima(where)
        abs_max = getattr(self, f"{side}_abs_max_{index}").float()
        return ChannelMaxima(abs_max, located.value, located.token, located.batch)


def _flat(maxima: ChannelMaxima | None) -> ChannelMaxima | None:
    """An experts module's ``[experts, C]`` maxima as one ``[experts * C]`` row (dense: as is)."""
    if maxima is None or maxima.abs_max.dim() == 1:
        return maxima
    return ChannelMaxima(*(getattr(maxima, f.name).reshape(-1) for f in fields(ChannelMaxima)))


def _stacked(maxima: ChannelMaxima | None, experts: int) -> ChannelMaxima | None:
    """Inverse of :func:`_flat`."""
    if maxima is None:
        return None
    return ChannelMaxima(
        *(getattr(maxima, f.name).reshape(experts, -1) for f in fields(ChannelMaxima))
    )
