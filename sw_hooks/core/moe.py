"""Mixture-of-experts: find, record, detect and prune per expert.

A layer's experts come in one of two layouts, and both are supported:

* **fused** (transformers 5): one experts module holding 3-D parameters,
  ``down_proj`` ``[experts, hidden, intermediate]`` and ``gate_up_proj``
  ``[experts, 2 * intermediate, hidden]``, called as
  ``experts(hidden_states, top_k_index, top_k_weights)``. A weight is addressed as
  ``("...mlp.experts.down_proj", expert, row, col)``.
* **list** (older checkpoints, other libraries): a ``ModuleList`` of per-expert MLPs,
  each with its own down-projection ``Linear``. A weight is addressed as
  ``("...mlp.experts.3.down_proj", 3, row, col)``.

An expert as a whole (a *unit*) is ``(experts module name, expert)``.

How the fused layout is recorded, and why this way: there is no per-expert module to
hook, and transformers picks the experts' kernel at run time (``grouped_mm`` by default,
``batched_mm``, a per-expert ``eager`` loop, hub kernels). While recording, the experts
module's ``forward`` is replaced, on that instance only, by one that runs the same kernel:
for transformers' ``grouped_mm`` and ``batched_mm`` an observed twin
(:mod:`sw_hooks.core.expert_kernels`) that calls the same grouped and batched linear helpers in the
same order, so the model's output is bit for bit unchanged, and hands the recorder the
down-projection's input and output with each row's expert and token. Nothing is computed
twice. The routing counts are the router's own choices and every routed token is covered.
For any other kernel (``eager``, hub kernels, expert parallelism), or when something else
already replaced the module's ``forward`` (e.g. accelerate's offloading hooks), the module
runs untouched and the recorder recomputes, expert by expert, the down-projection for the
tokens routed there with the module's own parameters and gating
(:func:`fused_down_projection`): exact too, at the price of one extra expert pass.
Nothing runs when no recorder is attached: dense models pay nothing. Costs are measured in
``benchmarks/bench_moe.py``.
"""

from __future__ import annotations

import inspect
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sw_hooks.analysis.detect import (
    DetectionOptions,
    _ids_of,
    _options,
    _spike_channels,
    finish_detection,
    forward_on_device,
    spiking_layers,
)
from sw_hooks.analysis.impact import perplexity
from sw_hooks.core.access import WeightElement
from sw_hooks.core.expert_kernels import DownProjectionObserver, observed_kernel
from sw_hooks.core.hooks import HookSet
from sw_hooks.core.locate import layer_index
from sw_hooks.core.masks import ablate
from sw_hooks.core.record import (
    ChannelMaxima,
    ChannelStats,
    TokenMasks,
    channel_maxima,
    merge_channel_maxima,
)
from sw_hooks.core.results import DetectionResult, SuperWeight

Progress = Callable[[str], None]
Unit = tuple[str, int]

# Names of an expert MLP's down-projection in the list layout (Llama-style, old Mixtral,
# GPT-2, OPT, NeoX).
_EXPERT_DOWN_NAMES = ("down_proj", "w2", "c_proj", "fc2", "dense_4h_to_h")
# What an experts module or MoE block is called (module name's last part, class name).
_MOE_NAME = re.compile(r"(experts|moe)$", re.IGNORECASE)
_MOE_CLASS = re.compile(
    r"(Experts|SparseMoe\w*|Moe(Block|Layer)|MoE(Block|Layer)?|MixtureOfExperts)$"
)


# -- locating ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExpertsModule:
    """One layer's experts, in either layout.

    Attributes:
        name: the experts module's name, e.g. ``model.layers.1.mlp.experts``.
        module: the module itself.
        layout: ``"fused"`` (3-D parameters) or ``"list"`` (a ``ModuleList`` of MLPs).
        num_experts: how many experts the layer holds.
        down_leaf: the per-expert down-projection's attribute name (list layout).
    """

    name: str
    module: nn.Module
    layout: str
    num_experts: int
    down_leaf: str = "down_proj"

    @property
    def layer(self) -> int | None:
        return layer_index(self.name)

    def coordinate_name(self, expert: int) -> str:
        """The ``module`` of a weight coordinate inside ``expert``."""
        if self.layout == "fused":
            return f"{self.name}.down_proj"
        return f"{self.name}.{expert}.{self.down_leaf}"

    def expert_down_projection(self, expert: int) -> nn.Module:
        """The list layout's per-expert down-projection module."""
        return getattr(self.module[expert], self.down_leaf)

    def units(self) -> list[Unit]:
        return [(self.name, expert) for expert in range(self.num_experts)]


def _fused_signature_ok(module: nn.Module) -> bool:
    try:
        names = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return False
    return names[:2] == ["hidden_states", "top_k_index"]


def _as_fused(name: str, module: nn.Module) -> ExpertsModule | None:
    down = getattr(module, "down_proj", None)
    if not (isinstance(down, torch.Tensor) and down.dim() == 3):
        return None
    gate_up = getattr(module, "gate_up_proj", None)
    up = getattr(module, "up_proj", None)
    has_gate = isinstance(gate_up, torch.Tensor) and gate_up.dim() == 3
    can_gate = hasattr(module, "_apply_gate") or hasattr(module, "act_fn")
    has_up = isinstance(up, torch.Tensor) and up.dim() == 3 and hasattr(module, "act_fn")
    if not ((has_gate and can_gate) or has_up) or not _fused_signature_ok(module):
        return None
    return ExpertsModule(name, module, "fused", int(down.shape[0]))


def _as_list(name: str, module: nn.Module) -> ExpertsModule | None:
    if not isinstance(module, nn.ModuleList) or not name.endswith("experts") or not len(module):
        return None
    for leaf in _EXPERT_DOWN_NAMES:
        downs = [getattr(expert, leaf, None) for expert in module]
        if all(isinstance(d, nn.Module) and _is_2d(d) for d in downs):
            return ExpertsModule(name, module, "list", len(module), leaf)
    return None


def _is_2d(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() == 2


def _inside(name: str, others: Iterable[str]) -> bool:
    return any(name == o or name.startswith(o + ".") or o.startswith(name + ".") for o in others)


def find_experts(model: nn.Module, *, warn: bool = True) -> dict[str, ExpertsModule]:
    """Find every layer's experts, in either layout, ordered by layer.

    Modules that look like experts (``*experts``, ``*Moe*``, ``*MoE*``) but that cannot be
    hooked are named in a ``UserWarning``: their experts are not recorded.

    Raises:
        ValueError: the model has no experts this module can hook.

    Example:
        >>> from sw_hooks.testing import tiny_moe_model
        >>> list(find_experts(tiny_moe_model("mixtral", num_layers=2)))
        ['model.layers.0.mlp.experts', 'model.layers.1.mlp.experts']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    found: dict[str, ExpertsModule] = {}
    for name, module in model.named_modules():
        unit = _as_fused(name, module) or _as_list(name, module)
        if unit is not None and not _inside(name, found):
            found[name] = unit
    skipped = unhookable_experts(model, found)
    if skipped and warn:
        warnings.warn(
            f"cannot hook the experts of {', '.join(skipped)}: their experts are not "
            "recorded (expected a fused experts module called as "
            "experts(hidden_states, top_k_index, ...) or a ModuleList of expert MLPs)",
            UserWarning,
            stacklevel=2,
        )
    if not found:
        raise ValueError(
            f"no mixture-of-experts layers that can be hooked in {type(model).__name__}"
        )
    return dict(sorted(found.items(), key=lambda item: (item[1].layer or 0, item[0])))


def unhookable_experts(model: nn.Module, found: Mapping[str, ExpertsModule]) -> list[str]:
    """Names of expert-looking modules outside (and not around) any hookable experts module."""
    return [
        name
        for name, module in model.named_modules()
        if name
        and (_MOE_NAME.search(name.rsplit(".", 1)[-1]) or _MOE_CLASS.search(type(module).__name__))
        and not _inside(name, found)
    ]


# -- recomputing one expert's down-projection ---------------------------------------------
def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool):
    return F.linear(x, weight.t() if transposed else weight, bias)


def _expert_bias(experts: nn.Module, name: str, expert: int) -> torch.Tensor | None:
    if getattr(experts, "has_bias", False) is not True:
        return None
    bias = getattr(experts, name, None)
    return bias[expert] if isinstance(bias, torch.Tensor) else None


def fused_down_projection(
    experts: nn.Module, hidden: torch.Tensor, expert: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(down_proj input, down_proj output)`` of one fused expert for ``hidden`` ``[n, hidden]``.

    Uses the experts module's own parameters, orientation, biases and gating, as its eager
    implementation does.

    Example:
        >>> from sw_hooks.testing import tiny_moe_model
        >>> experts = tiny_moe_model("mixtral", num_layers=1).model.layers[0].mlp.experts
        >>> inner, out = fused_down_projection(experts, torch.ones(3, 64), 2)
        >>> tuple(inner.shape), tuple(out.shape)
        ((3, 64), (3, 64))
    """
    transposed = getattr(experts, "is_transposed", False) is True
    gate_up = getattr(experts, "gate_up_proj", None)
    if isinstance(gate_up, torch.Tensor) and getattr(experts, "has_gate", True):
        projected = _linear(
            hidden, gate_up[expert], _expert_bias(experts, "gate_up_proj_bias", expert), transposed
        )
        if hasattr(experts, "_apply_gate"):
            inner = experts._apply_gate(projected)
        else:
            gate, up = projected.chunk(2, dim=-1)
            inner = experts.act_fn(gate) * up
    else:
        inner = experts.act_fn(
            _linear(
                hidden,
                experts.up_proj[expert],
                _expert_bias(experts, "up_proj_bias", expert),
                transposed,
            )
        )
    bias = _expert_bias(experts, "down_proj_bias", expert)
    return inner, _linear(inner, experts.down_proj[expert], bias, transposed)


# -- recording -----------------------------------------------------------------------------
@dataclass(frozen=True)
class ExpertStats:
    """What the expert recorder keeps for one layer's experts.

    Attributes:
        input: ``[experts, intermediate]`` maxima of the down-projections' inputs.
        output: ``[experts, hidden]`` maxima of the down-projections' outputs.
        tokens: ``[experts]`` int64, tokens routed to each expert.
        calls: forward calls of the experts module (fused layout) or of the experts'
            down-projections (list layout).

    Positions (``token``, ``batch``) are -1 where an expert was never routed to, and for
    the list layout, whose experts only see their gathered tokens.
    """

    input: ChannelMaxima | None
    output: ChannelMaxima | None
    tokens: torch.Tensor
    calls: int

    def expert(self, expert: int) -> ChannelStats:
        """One expert's maxima, as a dense module's :class:`ChannelStats`."""

        def row(m: ChannelMaxima | None) -> ChannelMaxima | None:
            return (
                None
                if m is None
                else ChannelMaxima(*(getattr(m, f.name)[expert] for f in fields(m)))
            )

        return ChannelStats(row(self.input), row(self.output), int(self.tokens[expert]))

    def output_peaks(self) -> torch.Tensor:
        """``[experts]`` max ``|down_proj output|`` of each expert (0 if never routed)."""
        if self.output is None:
            raise ValueError("outputs were not recorded")
        return self.output.abs_max.amax(dim=1)


def _empty_maxima(experts: int, channels: int, device: torch.device) -> ChannelMaxima:
    zeros = torch.zeros(experts, channels, device=device)
    unknown = torch.full((experts, channels), -1, dtype=torch.long, device=device)
    return ChannelMaxima(zeros, zeros.clone(), unknown, unknown.clone())


def _set_row(target: ChannelMaxima, expert: int, maxima: ChannelMaxima, positions: torch.Tensor):
    """Write one expert's maxima into row ``expert``; ``positions`` maps local rows to flat tokens."""
    target.abs_max[expert] = maxima.abs_max
    target.value[expert] = maxima.value
    target.token[expert] = positions[maxima.token]


def merge_expert_stats(a: ExpertStats | None, b: ExpertStats) -> ExpertStats:
    """Elementwise max of maxima, sum of routing counts and calls."""
    if a is None:
        return b
    return ExpertStats(
        merge_channel_maxima(a.input, b.input),
        merge_channel_maxima(a.output, b.output),
        a.tokens + b.tokens.to(a.tokens.device),
        a.calls + b.calls,
    )


class ExpertRecorder:
    """Hooks that keep per-expert, per-channel max ``|input|`` and ``|output|`` of the experts'
    down-projections and per-expert routing counts. O(experts x channels) state per layer.

    Make one with :func:`record_experts`. Padded tokens (``attention_mask=`` given to the
    model) are left out of the maxima and the counts of fused experts.
    """

    def __init__(
        self,
        model: nn.Module,
        experts: Mapping[str, ExpertsModule] | None = None,
        *,
        inputs: bool = True,
        outputs: bool = True,
        _recompute: bool = False,
    ) -> None:
        if not (inputs or outputs):
            raise ValueError(
                "record_experts(): nothing to record with inputs=False and outputs=False"
            )
        self.experts = dict(experts) if experts is not None else find_experts(model)
        self._inputs, self._outputs = inputs, outputs
        self._recompute = _recompute
        self._masks = TokenMasks()
        self._root_seq_len: int | None = None
        self._stats: dict[str, ExpertStats] = {}
        self._hooks = HookSet()
        try:
            with self._hooks.registering():
                self._hook_model(model)
                for unit in self.experts.values():
                    self._hook(unit)
        except BaseException:
            self.remove()
            raise

    def _hook(self, unit: ExpertsModule) -> None:
        if unit.layout == "fused" and not self._recompute and "forward" not in vars(unit.module):
            self._hooks.add(_ObservedForward(unit.module, self, unit))
            return
        if unit.layout == "fused":
            hook = self._fused_hook(unit)
            self._hooks.forward(unit.module, hook, with_kwargs=True)
            return
        for expert in range(unit.num_experts):
            down = unit.expert_down_projection(expert)
            self._hooks.forward(down, self._list_hook(unit, expert))

    def _hook_model(self, model: nn.Module) -> None:
        """Padding masks where the model that receives them sits; the sequence length."""

        def capture(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is None:
                ids = kwargs.get("inputs_embeds")
            self._root_seq_len = (
                int(ids.shape[1]) if isinstance(ids, torch.Tensor) and ids.dim() >= 2 else None
            )

        def release(*_: Any) -> None:
            self._root_seq_len = None

        self._hooks.pre(model, capture, with_kwargs=True)
        self._hooks.forward(model, release, with_kwargs=True, always_call=True)
        self._masks.attach(model, [u.module for u in self.experts.values()], self._hooks)

    @property
    def _token_mask(self) -> torch.Tensor | None:
        mask = self._masks.current
        return mask.reshape(-1) if mask is not None else None

    @property
    def _seq_len(self) -> int | None:
        mask = self._masks.current
        return int(mask.shape[1]) if mask is not None else self._root_seq_len

    def _fused_hook(self, unit: ExpertsModule):
        def fold(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
        ) -> None:
            hidden, index, _ = _routing_arguments(args, kwargs)
            with torch.no_grad():
                self._fold(unit.name, self._fused_stats(unit, hidden.detach(), index))

        return fold

    def _observer(self, unit: ExpertsModule, num_tokens: int) -> DownProjectionObserver:
        def observe(
            inner: torch.Tensor, out: torch.Tensor, expert: torch.Tensor, token: torch.Tensor
        ) -> None:
            with torch.no_grad():
                stats = self._observed_stats(
                    unit, inner.detach(), out.detach(), expert, token, num_tokens
                )
                self._fold(unit.name, stats)

        return observe

    def _observed_stats(
        self,
        unit: ExpertsModule,
        inner: torch.Tensor,
        out: torch.Tensor,
        expert: torch.Tensor,
        token: torch.Tensor,
        num_tokens: int,
    ) -> ExpertStats:
        """The same stats as :meth:`_fused_stats`, from rows the kernel computed.

        Each expert's rows are put in token order, the order the recomputing path gathers
        them in, so a tie keeps the same (first) token.
        """
        count = unit.num_experts
        mask = self._token_mask
        if mask is not None and mask.numel() == num_tokens:
            expert = expert.masked_fill(~mask.to(expert.device)[token], count)
        tokens = torch.bincount(expert, minlength=count + 1)[:count].cpu()
        # A token picks an expert at most once, so (expert, token) keys are unique.
        order = torch.argsort(expert * num_tokens + token)
        ends = tokens.cumsum(0).tolist()
        inputs = outputs = None
        for index in tokens.nonzero().flatten().tolist():
            rows = order[ends[index] - int(tokens[index]) : ends[index]]
            positions = token[rows]
            if self._inputs:
                if inputs is None:
                    inputs = _empty_maxima(count, inner.shape[-1], inner.device)
                _set_row(inputs, index, channel_maxima(inner[rows]), positions)
            if self._outputs:
                if outputs is None:
                    outputs = _empty_maxima(count, out.shape[-1], out.device)
                _set_row(outputs, index, channel_maxima(out[rows]), positions)
        return ExpertStats(self._located(inputs), self._located(outputs), tokens, 1)

    def _fused_stats(
        self, unit: ExpertsModule, hidden: torch.Tensor, index: torch.Tensor
    ) -> ExpertStats:
        count = unit.num_experts
        mask = self._token_mask
        if mask is not None and mask.numel() == index.shape[0]:
            # Padding is routed like any token; route it nowhere for the record.
            index = index.masked_fill(~mask.to(index.device)[:, None], count)
        tokens = torch.bincount(index.reshape(-1), minlength=count + 1)[:count].cpu()
        inputs = outputs = None
        for expert in tokens.nonzero().flatten().tolist():
            rows = (index == expert).any(dim=-1).nonzero().flatten()
            inner, out = fused_down_projection(unit.module, hidden[rows], expert)
            if self._inputs:
                if inputs is None:
                    inputs = _empty_maxima(count, inner.shape[-1], inner.device)
                _set_row(inputs, expert, channel_maxima(inner), rows)
            if self._outputs:
                if outputs is None:
                    outputs = _empty_maxima(count, out.shape[-1], out.device)
                _set_row(outputs, expert, channel_maxima(out), rows)
        return ExpertStats(self._located(inputs), self._located(outputs), tokens, 1)

    def _located(self, maxima: ChannelMaxima | None) -> ChannelMaxima | None:
        """Split flat token indices (``batch * seq + position``) into batch and position."""
        if maxima is None or not self._seq_len:
            return maxima
        flat, seen = maxima.token, maxima.token >= 0
        token = torch.where(seen, flat % self._seq_len, flat)
        batch = torch.where(seen, flat // self._seq_len, flat)
        return ChannelMaxima(maxima.abs_max, maxima.value, token, batch)

    def _list_hook(self, unit: ExpertsModule, expert: int):
        def fold(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            y = output.detach().reshape(-1, output.shape[-1])
            count = unit.num_experts
            tokens = torch.zeros(count, dtype=torch.long)
            tokens[expert] = x.shape[0]
            inputs = outputs = None
            unknown = torch.full((max(x.shape[0], 1),), -1, dtype=torch.long, device=x.device)
            if self._inputs and x.shape[0]:
                inputs = _empty_maxima(count, x.shape[-1], x.device)
                _set_row(inputs, expert, channel_maxima(x), unknown)
            if self._outputs and x.shape[0]:
                outputs = _empty_maxima(count, y.shape[-1], y.device)
                _set_row(outputs, expert, channel_maxima(y), unknown)
            self._fold(unit.name, ExpertStats(inputs, outputs, tokens, 1))

        return fold

    def _fold(self, name: str, new: ExpertStats) -> None:
        self._stats[name] = merge_expert_stats(self._stats.get(name), new)

    @property
    def stats(self) -> dict[str, ExpertStats]:
        """``{experts module name: ExpertStats}`` for every experts module called."""
        return dict(self._stats)

    def reset(self) -> None:
        """Forget everything recorded so far; the hooks stay."""
        self._stats.clear()

    def remove(self) -> None:
        """Remove every hook, newest first. Safe to call twice."""
        self._hooks.remove()
        self._masks.clear()
        self._root_seq_len = None

    def __enter__(self) -> ExpertRecorder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


def _routing_arguments(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(hidden_states, top_k_index, top_k_weights)`` of a fused experts call."""
    names = ("hidden_states", "top_k_index", "top_k_weights")
    values = [args[i] if len(args) > i else kwargs.get(name) for i, name in enumerate(names)]
    return values[0], values[1], values[2]


class _ObservedForward:
    """Replaces one fused experts module's ``forward`` while recording; :meth:`remove` undoes it.

    At each call, a kernel with an observed twin runs as that twin and reports its
    down-projection; any other runs as the class's own ``forward``, and the recorder
    recomputes. Extra positional or keyword arguments also take the class's path.
    """

    def __init__(self, module: nn.Module, recorder: ExpertRecorder, unit: ExpertsModule) -> None:
        self.module, self.recorder, self.unit = module, recorder, unit
        self.recompute = recorder._fused_hook(unit)
        # inspect.signature follows __wrapped__: find_experts still recognises the module.
        self.__wrapped__ = module.forward
        module.forward = self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        kernel = observed_kernel(self.module)
        extra = len(args) > 3 or set(kwargs) - {"hidden_states", "top_k_index", "top_k_weights"}
        if kernel is None or extra:
            output = type(self.module).forward(self.module, *args, **kwargs)
            self.recompute(self.module, args, kwargs, output)
            return output
        hidden, index, weights = _routing_arguments(args, kwargs)
        observe = self.recorder._observer(self.unit, hidden.shape[0])
        return kernel(self.module, hidden, index, weights, observe)

    def remove(self) -> None:
        if vars(self.module).get("forward") is self:
            del self.module.forward


def record_experts(
    model: nn.Module,
    experts: Mapping[str, ExpertsModule] | None = None,
    *,
    inputs: bool = True,
    outputs: bool = True,
) -> ExpertRecorder:
    """Record per-expert down-projection maxima and routing counts of an MoE model.

    Example:
        >>> from sw_hooks.testing import tiny_moe_model
        >>> model = tiny_moe_model("mixtral", num_layers=2)
        >>> with record_experts(model) as rec, torch.no_grad():
        ...     _ = model(torch.tensor([[20, 21, 22]]))
        >>> int(rec.stats["model.layers.0.mlp.experts"].tokens.sum())  # 3 tokens x top-2
        6
    """
    return ExpertRecorder(model, experts, inputs=inputs, outputs=outputs)


# -- single weights inside experts ---------------------------------------------------------
def expert_spike_candidates(
    model: nn.Module,
    stats: Mapping[str, ExpertStats],
    experts: Mapping[str, ExpertsModule],
    options: DetectionOptions | None = None,
) -> list[SuperWeight]:
    """Candidate super weights inside experts: :func:`~sw_hooks.analysis.detect.spike_candidates` per expert.

    Every routed expert of every layer is one unit of the population whose median sets
    the spike bar; inside a spiking expert, a spike pair ``(row, col)`` whose weight can
    explain the output spike is a candidate carrying ``expert``.
    """
    options = options or DetectionOptions()
    units: dict[Unit, ChannelStats] = {
        (name, expert): layer.expert(expert)
        for name, layer in stats.items()
        for expert in layer.tokens.nonzero().flatten().tolist()
    }
    # spiking_layers only iterates the mapping: (module, expert) keys work as names do.
    spiking = spiking_layers(units, options.spike_factor)  # type: ignore[arg-type]
    found: list[SuperWeight] = []
    for name, expert in spiking:
        found += _unit_candidates(model, experts[name], expert, units[(name, expert)], options)
    return found


def _unit_candidates(
    model: nn.Module,
    unit: ExpertsModule,
    expert: int,
    stats: ChannelStats,
    options: DetectionOptions,
) -> list[SuperWeight]:
    inputs, outputs = stats.input, stats.output
    coordinate = unit.coordinate_name(expert)
    found = []
    for row in _spike_channels(outputs, options.channel_ratio, options.max_channels):
        for col in _spike_channels(inputs, options.channel_ratio, options.max_channels):
            value = WeightElement.resolve(model, (coordinate, expert, row, col)).read_float()
            if abs(value) * float(inputs.abs_max[col]) >= options.min_contribution * float(
                outputs.abs_max[row]
            ):
                found.append(
                    SuperWeight(
                        module=coordinate,
                        layer=unit.layer,
                        row=row,
                        col=col,
                        value=value,
                        input_activation=float(inputs.value[col]),
                        output_activation=float(outputs.value[row]),
                        token_position=max(int(outputs.token[row]), 0),
                        expert=expert,
                    )
                )
    return found


def find_expert_candidates(
    model: nn.Module,
    inputs: torch.Tensor | Mapping[str, torch.Tensor],
    options: DetectionOptions | None = None,
    *,
    progress: Progress | None = None,
) -> tuple[list[SuperWeight], int]:
    """Record -> candidates -> ablate, until no expert shows a new spike pair.

    Returns ``(candidates in discovery order, passes run)``.
    """
    options = options or DetectionOptions()
    experts = find_experts(model)
    found: list[SuperWeight] = []
    passes = 0
    for passes in range(1, options.max_passes + 1):
        with ablate(model, found), record_experts(model, experts) as recorder:
            forward_on_device(model, inputs)
        explained = {(w.module, w.expert) for w in found}
        new = [
            c
            for c in expert_spike_candidates(model, recorder.stats, experts, options)
            if (c.module, c.expert) not in explained
        ]
        if progress:
            progress(f"pass {passes}: {len(new)} new expert candidate(s)")
        if not new:
            break
        found += new
    return found, passes


def detect_expert_weights(
    model: nn.Module,
    inputs: torch.Tensor | Mapping[str, torch.Tensor],
    *,
    calibration: torch.Tensor | None = None,
    verify_impact: bool = True,
    options: DetectionOptions | None = None,
    model_name: str | None = None,
    progress: Progress | None = None,
    **overrides: Any,
) -> DetectionResult:
    """Detect super weights inside experts and verify each by zeroing it.

    The same method and options as :func:`~sw_hooks.analysis.detect.run_detection`, per expert;
    each result carries ``expert``.

    Example:
        >>> from sw_hooks.testing import planted_moe
        >>> planted = planted_moe("mixtral")
        >>> result = detect_expert_weights(
        ...     planted.model, planted.prompt(), calibration=planted.calibration_ids()
        ... )
        >>> [(w.layer, w.expert, w.row, w.col, w.verdict) for w in result.super_weights]
        [(1, 3, 5, 17, 'super')]
    """
    options = _options(options, overrides)
    candidates, passes = find_expert_candidates(model, inputs, options, progress=progress)
    return finish_detection(
        model,
        candidates,
        passes,
        inputs,
        calibration=calibration,
        verify_impact=verify_impact,
        options=options,
        model_name=model_name,
        progress=progress,
    )


# -- pruning whole experts -----------------------------------------------------------------
class ExpertPruning:
    """Zero chosen experts' routing weights inside the context; weights are never touched.

    Fused experts: a forward pre-hook zeroes ``top_k_weights`` wherever ``top_k_index``
    names a pruned expert, so its output is dropped from every token's mix (the other
    experts' weights are not renormalised). List layout: the pruned expert's output is
    replaced by zeros, which is the same thing.
    """

    def __init__(self, model: nn.Module, units: Iterable[Unit]):
        experts = find_experts(model, warn=False)
        self._pruned: dict[str, list[int]] = {}
        for name, expert in units:
            if name not in experts:
                raise ValueError(f"no experts module named {name!r}; known: {list(experts)[:4]}...")
            if not (isinstance(expert, int) and 0 <= expert < experts[name].num_experts):
                raise ValueError(f"{name} has no expert {expert!r}")
            self._pruned.setdefault(name, []).append(expert)
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


def _zero_output(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(output)


def prune_experts(model: nn.Module, units: Iterable[Unit] | Unit) -> ExpertPruning:
    """Prune whole experts, ``(experts module name, expert)``, inside the context.

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
@dataclass(frozen=True)
class SuperExpert:
    """An expert whose down-projection output is massive compared with all experts'.

    Attributes:
        module: the experts module, e.g. ``model.layers.1.mlp.experts``.
        layer, expert: where it is.
        output_max: its max ``|down_proj output|``.
        channel: the output channel of that maximum.
        token_position: the token position of that maximum (-1 if unknown).
        tokens: tokens routed to it while recording.
        impact: perplexity with the expert pruned over without (``None`` if not measured).
        verdict: ``"super"`` when ``impact`` reached ``min_impact``, else ``"candidate"``.
    """

    module: str
    layer: int | None
    expert: int
    output_max: float
    channel: int
    token_position: int
    tokens: int
    impact: float | None = None
    verdict: str = "candidate"

    @property
    def unit(self) -> Unit:
        return (self.module, self.expert)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    progress: Progress | None = None,
) -> list[SuperExpert]:
    """Find super experts by the published criterion and verify each by pruning it.

    An expert is flagged when its max ``|down_proj output|`` is above the ``percentile``
    of all routed experts' maxima (over every layer) and above ``min_fraction`` of the
    largest (arXiv 2507.23279). Each flagged expert is then pruned alone
    (:func:`prune_experts`) and its impact is perplexity pruned over unpruned.

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
    ids = calibration if calibration is not None else _ids_of(inputs)

    def measure() -> float:
        return perplexity(model, ids, window=window, stride=stride)

    baseline = measure()
    verified = []
    for found in flagged:
        with prune_experts(model, [found.unit]):
            impact = measure() / baseline
        if progress:
            progress(f"prune layer {found.layer} expert {found.expert}: x{impact:.2f}")
        verdict = "super" if impact >= min_impact else "candidate"
        verified.append(replace(found, impact=impact, verdict=verdict))
    return verified
