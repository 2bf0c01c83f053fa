"""Whole experts: pruning them, and super experts (arXiv 2507.23279), found and verified.

A super expert is found from the same recording as everything else (the recorder's
per-expert maxima) and verified by the same measurement as a super weight
(:func:`sw_hooks.analysis.verify.measure_impacts`), told to prune the expert's routing
instead of zeroing one weight.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from sw_hooks.analysis.options import DetectionOptions
from sw_hooks.analysis.verify import VerifySettings, measure_impacts
from sw_hooks.core.devices import forward_on_device, ids_of
from sw_hooks.core.experts import ExpertsModule, find_experts
from sw_hooks.core.hooks import HookSet
from sw_hooks.core.locate import layer_index
from sw_hooks.core.maxima import ExpertStats
from sw_hooks.core.progress import Progress
from sw_hooks.core.record import record_experts
from sw_hooks.core.results import SuperExpert
from sw_hooks.core.units import Unit


# -- pruning whole experts -----------------------------------------------------------------
class ExpertPruning:
    """Zero chosen experts' routing weights inside the context; weights are never touched.

    Fused experts: a forward pre-hook zeroes ``top_k_weights`` wherever ``top_k_index``
    names a pruned expert, so its output is dropped from every token's mix (the other
    experts' weights are not renormalised). List layout: the pruned expert's output is
    replaced by zeros, which is the same thing.
    """

    def __init__(self, model: nn.Module, units: Iterable[ExpertKey]):
        experts = find_experts(model, warn=False)
        self._pruned: dict[str, list[int]] = {}
        for module, expert in units:
            owner = _owner(experts, module)
            if not (isinstance(expert, int) and 0 <= expert < experts[owner].num_experts):
                raise ValueError(f"{owner} has no expert {expert!r}")
            self._pruned.setdefault(owner, []).append(expert)
        self._experts = experts
        self._hooks = HookSet()

    def __enter__(self) -> ExpertPruning:
        with self._hooks.registering():
            for name, pruned in self._pruned.items():
                self._hook(self._experts[name], pruned)
        return self

    def _hook(self, unit: ExpertsModule, pruned: list[int]) -> None:
        if unit.layout == "list":
            for expert in pruned:
                self._hooks.forward(unit.module[expert], _zero_output)
            return
        pruned_ids = torch.tensor(pruned)

        def zero_routing(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]):
            args, kwargs = list(args), dict(kwargs)
            index = args[1] if len(args) > 1 else kwargs["top_k_index"]
            hit = torch.isin(index, pruned_ids.to(index.device))
            if len(args) > 2:
                args[2] = args[2].masked_fill(hit, 0)
            else:
                kwargs["top_k_weights"] = kwargs["top_k_weights"].masked_fill(hit, 0)
            return tuple(args), kwargs

        self._hooks.pre(unit.module, zero_routing, with_kwargs=True)

    def __exit__(self, *exc_info: object) -> None:
        self._hooks.remove()


ExpertKey = Unit | tuple[str, int]
"""An expert: ``(experts module, expert)``, or a :class:`Unit` (its down-projection's module)."""


def _owner(experts: Mapping[str, ExpertsModule], module: str) -> str:
    """The experts module that ``module`` names or lies inside."""
    for name, unit in experts.items():
        if unit.owns(module):
            return name
    raise ValueError(f"no experts module named {module!r}; known: {list(experts)[:4]}...")


def _zero_output(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(output)


def prune_experts(model: nn.Module, units: Iterable[ExpertKey] | ExpertKey) -> ExpertPruning:
    """Prune whole experts, ``(experts module name, expert)`` or units, inside the context.

    Example:
        >>> from sw_hooks.testing import tiny_moe_model
        >>> model = tiny_moe_model("mixtral", num_layers=1)
        >>> with prune_experts(model, ("model.layers.0.mlp.experts", 3)):
        ...     _ = model(torch.tensor([[20, 21]]))
    """
    if isinstance(units, tuple) and len(units) == 2 and isinstance(units[0], str):
        units = [units]
    return ExpertPruning(model, units)


# -- super experts (arXiv 2507.23279) -------------------------------------------------------
def super_expert_mask(
    peaks: torch.Tensor, percentile: float = 99.5, min_fraction: float = 0.1
) -> torch.Tensor:
    """The published criterion: above the ``percentile`` of all peaks and ``min_fraction`` of the largest.

    Example:
        >>> super_expert_mask(torch.tensor([1.0, 2.0, 1.5, 90.0])).tolist()
        [False, False, False, True]
    """
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {percentile!r}")
    if not 0.0 <= min_fraction <= 1.0:
        raise ValueError(f"min_fraction must be in [0, 1], got {min_fraction!r}")
    peaks = peaks.float()
    bar = torch.quantile(peaks, percentile / 100.0)
    return (peaks > bar) & (peaks > min_fraction * peaks.max())


def super_expert_candidates(
    stats: Mapping[str, ExpertStats], percentile: float = 99.5, min_fraction: float = 0.1
) -> list[SuperExpert]:
    """Apply :func:`super_expert_mask` over every routed expert of every layer."""
    routed = [
        (name, expert)
        for name, layer in stats.items()
        for expert in layer.tokens.nonzero().flatten().tolist()
    ]
    if not routed:
        return []
    peaks = torch.stack([stats[name].output_peaks()[expert] for name, expert in routed])
    flagged = super_expert_mask(peaks, percentile, min_fraction)
    return [
        _super_expert(stats[name], name, expert)
        for (name, expert), hit in zip(routed, flagged.tolist(), strict=True)
        if hit
    ]


def _super_expert(stats: ExpertStats, name: str, expert: int) -> SuperExpert:
    output = stats.expert(expert).output
    channel, peak = output.top()
    return SuperExpert(
        name,
        layer_index(name),
        expert,
        peak,
        channel,
        int(output.token[channel]),
        int(stats.tokens[expert]),
    )


def detect_super_experts(
    model: nn.Module,
    inputs: torch.Tensor | Mapping[str, torch.Tensor],
    *,
    calibration: torch.Tensor | None = None,
    percentile: float = 99.5,
    min_fraction: float = 0.1,
    verify_impact: bool = True,
    min_impact: float = 2.0,
    window: int = 512,
    stride: int = 256,
    screen_exponent: float | None = DetectionOptions.screen_exponent,
    progress: Progress | None = None,
) -> list[SuperExpert]:
    """Find super experts by the published criterion and verify each by pruning it.

    An expert is flagged when its max ``|down_proj output|`` is above the ``percentile``
    of all routed experts' maxima (over every layer) and above ``min_fraction`` of the
    largest (arXiv 2507.23279). Each flagged expert is then pruned alone
    (:func:`prune_experts`) and its impact is perplexity pruned over unpruned, measured by
    :func:`~sw_hooks.analysis.verify.measure_impacts` with the rule :func:`run_detection`
    uses: prefix reuse, and screening with its guard (``screen_exponent=None`` measures
    every expert on every window).

    Example:
        >>> from sw_hooks.testing import planted_moe
        >>> planted = planted_moe("mixtral")
        >>> found = detect_super_experts(
        ...     planted.model, planted.prompt(), calibration=planted.calibration_ids(),
        ...     percentile=90.0,
        ... )
        >>> [(e.layer, e.expert, e.verdict) for e in found]
        [(1, 3, 'super'), (2, 6, 'super')]
    """
    with record_experts(model, inputs=False) as recorder:
        forward_on_device(model, inputs)
    flagged = super_expert_candidates(recorder.stats, percentile, min_fraction)
    if not verify_impact or not flagged:
        return flagged
    ids = calibration if calibration is not None else ids_of(inputs)
    settings = VerifySettings(min_impact, window, stride, screen_exponent=screen_exponent)
    measured = measure_impacts(
        model, flagged, ids, settings, ablation=prune_super_experts, progress=progress
    )
    return measured.weights


def prune_super_experts(model: nn.Module, experts: Sequence[SuperExpert]) -> ExpertPruning:
    """:func:`prune_experts` for found experts: the ablation that verifies a super expert."""
    return prune_experts(model, [expert.unit for expert in experts])
