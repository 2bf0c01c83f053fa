"""The recorder: forward hooks that fold every call into running per-channel maxima.

One recorder for every kind of down-projection: the dense ones (a ``Linear``, GPT-2's
``Conv1D``, ...) and the experts of mixture-of-experts layers, in the fused and the list
layout (:mod:`sw_hooks.core.expert_record`). What it yields is ``{Unit: ChannelStats}``
(:attr:`Recorder.units`), a unit being ``(module, expert | None)``; everything downstream
(candidates, the monitor, the report) is written once for units.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from sw_hooks.core.expert_record import ExpertTaps
from sw_hooks.core.experts import ExpertsModule, find_experts
from sw_hooks.core.first_call import FirstCallLocator
from sw_hooks.core.hooks import HookSet
from sw_hooks.core.locate import find_down_projections
from sw_hooks.core.maxima import (  # noqa: F401  (re-exported: the recorder's vocabulary)
    LOCATED_CHANNELS,
    ChannelMaxima,
    ChannelStats,
    ExpertStats,
    Locations,
    _located_count,
    channel_maxima,
    merge_channel_maxima,
    merge_expert_stats,
    merge_stats,
    stats_from_state_dict,
    stats_to_state_dict,
)
from sw_hooks.core.structure import ExampleInputNeeded
from sw_hooks.core.token_masks import TokenMasks, mask_receivers, token_mask  # noqa: F401
from sw_hooks.core.units import Unit

ModuleSelection = Mapping[str, nn.Module] | Iterable[str] | str | re.Pattern[str] | None
ExpertSelection = Mapping[str, ExpertsModule] | bool | None
"""Which experts to record: ``None`` those of the model when ``modules`` is left to find the
down-projections, ``True`` the model's (an error if it has none), ``False`` none, or a
:func:`~sw_hooks.core.experts.find_experts` mapping."""


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, tuple | list) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


class Recorder:
    """Forward hooks that keep per-channel max ``|input|`` and ``|output|`` of chosen modules.

    Use :func:`record` to make one. Unlike the masks, it hooks the model when it is made,
    not on ``__enter__``: ``rec = record(model)`` records every forward from then on, until
    :meth:`remove`. It is also a context manager whose exit removes the hooks, even when
    the forward raised. A 2-D ``attention_mask=`` keeps padded tokens out of the maxima,
    whether it is passed to the model or, inside it, to the module that receives it (a
    training wrapper's inner model).
    """

    def __init__(
        self,
        model: nn.Module,
        modules: ModuleSelection = None,
        *,
        inputs: bool = True,
        outputs: bool = True,
        use_attention_mask: bool = True,
        locations: Locations = LOCATED_CHANNELS,
        experts: ExpertSelection = None,
        recompute_experts: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"record() needs a torch.nn.Module, got {type(model).__name__}")
        if not (inputs or outputs):
            raise ValueError("record(): nothing to record with inputs=False and outputs=False")
        _located_count(locations, 1)  # a bad value is refused before any hook exists
        try:
            selected, found_experts = select_units(model, modules, experts)
            on_first_call = False
        except ExampleInputNeeded:  # found by structure on the first call (first_call.py)
            selected, found_experts, on_first_call = {}, {}, True
        _check_not_meta(selected)
        self.module_names: tuple[str, ...] = tuple(selected)
        self.experts: dict[str, ExpertsModule] = found_experts
        # Weakly: a recorder kept for its stats must not keep the model alive.
        self._model, self._use_attention_mask = weakref.ref(model), use_attention_mask
        self._inputs, self._outputs, self._locations = inputs, outputs, locations
        self._masks = TokenMasks()
        self._stats: dict[str, ChannelStats] = {}
        self._taps = ExpertTaps(
            found_experts, self._masks, inputs=inputs, outputs=outputs, recompute=recompute_experts
        )
        self._hooks = HookSet()
        recorded = [*selected.values(), *(unit.module for unit in found_experts.values())]
        with self._hooks.registering():
            for name, module in selected.items():
                self._hooks.forward(module, self._fold_hook(name))
            if found_experts:
                self._taps.attach(model, self._hooks)
            if use_attention_mask:
                self._masks.attach(model, recorded, self._hooks)
        self._locator = FirstCallLocator(model, self._install) if on_first_call else None

    @property
    def modules(self) -> dict[str, nn.Module]:
        """``{name: module}`` of the dense modules recorded: for a model whose
        down-projections are found on its first call, empty until that call."""
        model = self._model()
        if model is None:
            return {}
        return {name: model.get_submodule(name) for name in self.module_names}

    # -- hooks ---------------------------------------------------------------------------
    def _install(
        self,
        found: dict[str, nn.Module],
        called: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        """Hook the projections found on a call under way, before its forward goes on."""
        self.module_names += tuple(found)
        with self._hooks.registering():
            for name, module in found.items():
                self._hooks.forward(module, self._fold_hook(name))
            if self._use_attention_mask:
                model = self._model()  # alive: it is being called
                root = model if model is not None else called
                receivers = self._masks.attach(root, found.values(), self._hooks)
                if any(receiver is called for receiver in receivers):
                    # Its entry hook was added too late for this call: push its mask now.
                    self._masks.enter(called, args, kwargs)

    def _fold_hook(self, name: str):
        def fold(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            self._fold(name, _first_tensor(args), _first_tensor(output))

        return fold

    # Run the bookkeeping eagerly under torch.compile: traced, the stats dict becomes part
    # of every graph's guards and each call recompiles (measured: 52x more captured calls).
    @torch.compiler.disable
    def _fold(self, name: str, x: torch.Tensor | None, y: torch.Tensor | None) -> None:
        previous = self._stats.get(name)
        mask, where = self._masks.current, self._locations
        new_in = (
            channel_maxima(x, mask, locations=where) if self._inputs and x is not None else None
        )
        new_out = (
            channel_maxima(y, mask, locations=where) if self._outputs and y is not None else None
        )
        if previous is None:
            self._stats[name] = ChannelStats(new_in, new_out, 1)
        else:
            self._stats[name] = merge_stats(previous, ChannelStats(new_in, new_out, 1))

    # -- results -------------------------------------------------------------------------
    @property
    def stats(self) -> dict[str, ChannelStats]:
        """``{module_name: ChannelStats}`` for every dense module called at least once."""
        return dict(self._stats)

    @property
    def expert_stats(self) -> dict[str, ExpertStats]:
        """``{experts module name: ExpertStats}`` for every experts module called."""
        return dict(self._taps.stats)

    @property
    def units(self) -> dict[Unit, ChannelStats]:
        """Every recorded unit: the dense modules, then each routed expert, as ``ChannelStats``.

        An expert's ``calls`` is the number of tokens routed to it.
        """
        found = {Unit(name): stats for name, stats in self._stats.items()}
        for name, stats in self._taps.stats.items():
            found |= self.experts[name].routed_units(stats)
        return found

    def reset(self) -> None:
        """Forget everything recorded so far; the hooks stay."""
        self._stats.clear()
        self._taps.stats.clear()

    def merge(self, other: Recorder | Mapping[str, ChannelStats | ExpertStats]) -> None:
        """Fold another recorder's stats (or a stats dict) into this one, elementwise max."""
        incoming = other.all_stats if isinstance(other, Recorder) else other
        for name, theirs in incoming.items():
            if isinstance(theirs, ExpertStats):
                self._taps.stats[name] = merge_expert_stats(self._taps.stats.get(name), theirs)
            else:
                mine = self._stats.get(name)
                self._stats[name] = theirs if mine is None else merge_stats(mine, theirs)

    @property
    def all_stats(self) -> dict[str, ChannelStats | ExpertStats]:
        """:attr:`stats` and :attr:`expert_stats` in one mapping, keyed by module name."""
        return {**self._stats, **self._taps.stats}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat ``{"<module>.<input|output>.<field>": tensor, "<module>.calls": tensor}``;
        an experts module's maxima have a leading expert axis and it adds ``"<module>.tokens"``."""
        return stats_to_state_dict(self.all_stats)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Replace the recorded stats with a :meth:`state_dict`."""
        loaded = stats_from_state_dict(state)
        self._stats = {n: s for n, s in loaded.items() if isinstance(s, ChannelStats)}
        self._taps.stats = {n: s for n, s in loaded.items() if isinstance(s, ExpertStats)}

    # -- lifetime ------------------------------------------------------------------------
    def remove(self) -> None:
        """Remove every hook, newest first. Safe to call twice."""
        if self._locator is not None:
            self._locator.remove()
            self._locator = None
        self._hooks.remove()
        self._masks.clear()
        self._taps.clear()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


def record(
    model: nn.Module,
    modules: ModuleSelection = None,
    *,
    inputs: bool = True,
    outputs: bool = True,
    use_attention_mask: bool = True,
    locations: Locations = LOCATED_CHANNELS,
    experts: ExpertSelection = None,
) -> Recorder:
    """Record per-channel max ``|input|`` and ``|output|`` of the down-projections.

    The hooks are registered by this call, so recording starts at once; leaving a
    ``with`` block (or :meth:`Recorder.remove`) takes them off.

    Args:
        model: any ``nn.Module``.
        modules: which modules to hook: ``None`` for the down-projections
            (:func:`~sw_hooks.core.locate.find_down_projections`), a glob or compiled regex,
            a list of module names, or a ``{name: module}`` mapping. A model with no known
            module names and no Hugging Face config (a hand-written one) has them found
            by structure on its first call, from that call's own input
            (:mod:`sw_hooks.core.first_call`): ``with record(net): net(x)`` records that
            call too; a model where none are found raises from that call.
        inputs, outputs: which side(s) to record.
        use_attention_mask: ignore padded tokens, taking the 2-D ``attention_mask=``
            from the model's call or from the innermost module on the way to the recorded
            modules that is called with one (a ``LightningModule`` or training wrapper
            passes it to the model it holds).
        locations: for which channels to keep where the maximum happened (token, batch
            index): the :data:`LOCATED_CHANNELS` (32) largest of each call by default,
            ``True`` for every channel (an indexed reduction over the whole activation,
            about 6% of a forward on a CPU), ``False`` for none. Channels without a
            location have token and batch -1; every location kept is exact.
        experts: which mixture-of-experts layers to record per expert
            (:data:`ExpertSelection`); by default every one the model has, next to its
            dense down-projections. Their stats are :attr:`Recorder.expert_stats`, and
            each routed expert is a unit of :attr:`Recorder.units`.

    Example:
        >>> from sw_hooks.testing import tiny_model
        >>> model = tiny_model("llama", num_layers=2)
        >>> with record(model) as rec:
        ...     _ = model(torch.tensor([[1, 2, 3]]))
        >>> sorted(rec.stats)[0], rec.stats["model.layers.0.mlp.down_proj"].calls
        ('model.layers.0.mlp.down_proj', 1)
    """
    return Recorder(
        model,
        modules,
        inputs=inputs,
        outputs=outputs,
        use_attention_mask=use_attention_mask,
        locations=locations,
        experts=experts,
    )


def record_experts(
    model: nn.Module,
    experts: Mapping[str, ExpertsModule] | None = None,
    *,
    inputs: bool = True,
    outputs: bool = True,
) -> ExpertRecorder:
    """Record the experts only: :func:`record` with no dense modules.

    Example:
        >>> from sw_hooks.testing import tiny_moe_model
        >>> model = tiny_moe_model("mixtral", num_layers=2)
        >>> with record_experts(model) as rec, torch.no_grad():
        ...     _ = model(torch.tensor([[20, 21, 22]]))
        >>> int(rec.stats["model.layers.0.mlp.experts"].tokens.sum())  # 3 tokens x top-2
        6
    """
    return ExpertRecorder(model, experts, inputs=inputs, outputs=outputs)


class ExpertRecorder(Recorder):
    """A :class:`Recorder` of experts only, whose :attr:`stats` are its :attr:`expert_stats`."""

    def __init__(
        self,
        model: nn.Module,
        experts: Mapping[str, ExpertsModule] | None = None,
        *,
        inputs: bool = True,
        outputs: bool = True,
        _recompute: bool = False,
    ) -> None:
        super().__init__(
            model,
            [],
            inputs=inputs,
            outputs=outputs,
            experts=True if experts is None else experts,
            recompute_experts=_recompute,
        )

    @property
    def stats(self) -> dict[str, ExpertStats]:  # type: ignore[override]
        """``{experts module name: ExpertStats}`` for every experts module called."""
        return self.expert_stats


def select_units(
    model: nn.Module, modules: ModuleSelection, experts: ExpertSelection
) -> tuple[dict[str, nn.Module], dict[str, ExpertsModule]]:
    """The dense modules and the experts :func:`record` records for these arguments."""
    if isinstance(experts, Mapping):
        chosen = dict(experts)
    elif experts is True:
        chosen = find_experts(model)
    elif experts is None and modules is None:
        chosen = find_experts(model, required=False)
    else:
        chosen = {}
    if modules is None and chosen:
        dense = _dense_beside_experts(model)
        return {n: m for n, m in dense.items() if not _inside_experts(n, chosen)}, chosen
    return _select_modules(model, modules), chosen


def recorded_module_names(model: nn.Module) -> list[str]:
    """The modules :func:`record` hooks by default: dense down-projections, experts modules.

    Example:
        >>> from sw_hooks.testing import tiny_moe_model
        >>> recorded_module_names(tiny_moe_model("mixtral", num_layers=1))
        ['model.layers.0.mlp.experts']
    """
    modules, experts = select_units(model, None, None)
    return [*modules, *experts]


def _dense_beside_experts(model: nn.Module) -> dict[str, nn.Module]:
    """The dense down-projections of a model that has experts: there may be none."""
    try:
        return find_down_projections(model)
    except ValueError:
        return {}


def _inside_experts(name: str, experts: Mapping[str, ExpertsModule]) -> bool:
    return any(unit.owns(name) for unit in experts.values())


def _select_modules(model: nn.Module, modules: ModuleSelection) -> dict[str, nn.Module]:
    if modules is None or isinstance(modules, str | re.Pattern):
        return find_down_projections(model, modules)
    if isinstance(modules, Mapping):
        return dict(modules)
    names = list(modules)
    try:
        return {name: model.get_submodule(name) for name in names}
    except AttributeError as error:
        raise ValueError(f"record(): {error}") from None


def _check_not_meta(modules: Mapping[str, nn.Module]) -> None:
    for name, module in modules.items():
        weight = getattr(module, "weight", None)
        offloaded = getattr(module, "_hf_hook", None) is not None
        if isinstance(weight, torch.Tensor) and weight.device.type == "meta" and not offloaded:
            raise ValueError(
                f"{name} is on the meta device (no real weights); load the model with its "
                "weights, or with accelerate offloading, before recording"
            )
