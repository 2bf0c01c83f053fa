"""Recording inside experts: per-expert maxima of the down-projections, no second pass.

How the fused layout is recorded, and why this way: there is no per-expert module to
hook, and transformers picks the experts' kernel at run time (``grouped_mm`` by default,
``batched_mm``, a per-expert ``eager`` loop, hub kernels). While recording, the experts
module's ``forward`` is replaced, on that instance only, by one that runs the same kernel:
for transformers' ``grouped_mm`` and ``batched_mm`` an observed twin
(:mod:`sw_hooks.core.expert_kernels`) that calls the same grouped and batched linear
helpers in the same order, so the model's output is bit for bit unchanged, and hands the
taps the down-projection's input and output with each row's expert and token. Nothing is
computed twice. For any other kernel (``eager``, hub kernels, expert parallelism), or when
something else already replaced the module's ``forward`` (e.g. accelerate's offloading
hooks), the module runs untouched and the taps recompute, expert by expert, the
down-projection for the tokens routed there with the module's own parameters and gating
(:func:`~sw_hooks.core.experts.fused_down_projection`): exact too, at the price of one extra
expert pass. The list layout's experts are modules: each down-projection is hooked. Costs
are measured in ``benchmarks/bench_moe.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from sw_hooks.core.expert_kernels import DownProjectionObserver, observed_kernel
from sw_hooks.core.experts import ExpertsModule, fused_down_projection
from sw_hooks.core.hooks import HookSet
from sw_hooks.core.maxima import (
    ChannelMaxima,
    ExpertStats,
    channel_maxima,
    empty_expert_maxima,
    merge_expert_stats,
    set_expert_row,
)
from sw_hooks.core.token_masks import TokenMasks


class ExpertTaps:
    """The hooks that fold every experts call into per-expert maxima and routing counts.

    O(experts x channels) state per layer. Owned by a :class:`~sw_hooks.core.record.Recorder`,
    which gives it its hook set and padding masks: padded tokens are left out of the maxima
    and the counts of fused experts.
    """

    def __init__(
        self,
        experts: Mapping[str, ExpertsModule],
        masks: TokenMasks,
        *,
        inputs: bool = True,
        outputs: bool = True,
        recompute: bool = False,
    ) -> None:
        self.experts = dict(experts)
        self._inputs, self._outputs = inputs, outputs
        self._recompute = recompute
        self._masks = masks
        self._root_seq_len: int | None = None
        self.stats: dict[str, ExpertStats] = {}

    def attach(self, model: nn.Module, hooks: HookSet) -> None:
        """Hook ``model`` (for the sequence length) and every experts module, into ``hooks``."""
        self._hooks = hooks
        self._hook_model(model)
        for unit in self.experts.values():
            self._hook(unit)

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
        """The sequence length of the outer call, to split flat token indices."""

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
                    inputs = empty_expert_maxima(count, inner.shape[-1], inner.device)
                set_expert_row(inputs, index, channel_maxima(inner[rows]), positions)
            if self._outputs:
                if outputs is None:
                    outputs = empty_expert_maxima(count, out.shape[-1], out.device)
                set_expert_row(outputs, index, channel_maxima(out[rows]), positions)
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
                    inputs = empty_expert_maxima(count, inner.shape[-1], inner.device)
                set_expert_row(inputs, expert, channel_maxima(inner), rows)
            if self._outputs:
                if outputs is None:
                    outputs = empty_expert_maxima(count, out.shape[-1], out.device)
                set_expert_row(outputs, expert, channel_maxima(out), rows)
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
                inputs = empty_expert_maxima(count, x.shape[-1], x.device)
                set_expert_row(inputs, expert, channel_maxima(x), unknown)
            if self._outputs and x.shape[0]:
                outputs = empty_expert_maxima(count, y.shape[-1], y.device)
                set_expert_row(outputs, expert, channel_maxima(y), unknown)
            self._fold(unit.name, ExpertStats(inputs, outputs, tokens, 1))

        return fold

    def _fold(self, name: str, new: ExpertStats) -> None:
        self.stats[name] = merge_expert_stats(self.stats.get(name), new)

    def clear(self) -> None:
        """Forget the call in progress (the hooks are gone)."""
        self._root_seq_len = None


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

    def __init__(self, module: nn.Module, recorder: ExpertTaps, unit: ExpertsModule) -> None:
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
