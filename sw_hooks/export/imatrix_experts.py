"""Importance-matrix entries for mixture-of-experts layers: one row of sums per expert.

llama.cpp stores a layer's experts as 3-D tensors (``blk.N.ffn_gate_exps``, ``ffn_up_exps``,
``ffn_down_exps``) and ``llama-imatrix`` keeps, for each, the per-channel sums of squared
inputs and the count of tokens *per expert*: only the tokens routed to an expert reach its
weights. An entry here has the same layout: ``in_sum2`` ``[experts, channels]`` and
``counts`` ``[experts]``, under a name gguf maps to the 3-D tensor
(``model.layers.1.mlp.experts.down_proj`` -> ``blk.1.ffn_down_exps.weight``).

Both layouts of :mod:`sw_hooks.core.experts` are recorded:

* **fused** (3-D parameters): a forward hook on the experts module reads the hidden states
  and the routing; the gate and up projections of expert ``e`` take the hidden states of the
  tokens routed to ``e``, and its down-projection's input is recomputed with the module's
  own parameters and gating (:func:`~sw_hooks.core.experts.fused_down_projection`).
* **list** (a ``ModuleList`` of expert MLPs): each expert's linears are hooked and fold into
  their expert's row of the shared entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sw_hooks.core.experts import ExpertsModule, find_experts, fused_down_projection

Fold = Callable[[str, int, torch.Tensor], None]
"""``fold(entry, expert, rows)``: add the squares of ``rows`` ``[n, channels]`` to ``entry``."""

_LIST_LEAVES = ("gate_proj", "up_proj", "down_proj", "w1", "w2", "w3", "c_fc", "c_proj")


@dataclass(frozen=True)
class ExpertEntry:
    """One 3-D weight's entry: its name, its experts module and its input channels."""

    name: str
    experts: ExpertsModule
    channels: int


def expert_entries(model: nn.Module) -> list[ExpertEntry]:
    """Every experts weight of ``model`` that llama.cpp stores as a 3-D tensor, by entry name."""
    entries: list[ExpertEntry] = []
    for unit in find_experts(model, warn=False, required=False).values():
        if unit.layout == "fused":
            entries += _fused_entries(unit)
        else:
            entries += _list_entries(unit)
    return entries


def _fused_entries(unit: ExpertsModule) -> list[ExpertEntry]:
    module = unit.module
    hidden, inner = unit.channels()[1], unit.channels()[0]
    gated = isinstance(getattr(module, "gate_up_proj", None), torch.Tensor) and getattr(
        module, "has_gate", True
    )
    # llama.cpp splits a fused gate_up_proj into ffn_gate_exps and ffn_up_exps: both read
    # the same hidden states.
    first = ("gate_proj", "up_proj") if gated else ("up_proj",)
    return [ExpertEntry(f"{unit.name}.{leaf}", unit, hidden) for leaf in first] + [
        ExpertEntry(f"{unit.name}.down_proj", unit, inner)
    ]


def _list_entries(unit: ExpertsModule) -> list[ExpertEntry]:
    expert = unit.module[0]
    entries = []
    for leaf in _LIST_LEAVES:
        linear = getattr(expert, leaf, None)
        weight = getattr(linear, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2:
            channels = _in_features(linear)
            entries.append(ExpertEntry(f"{unit.name}.{leaf}", unit, channels))
    return entries


def _in_features(linear: nn.Module) -> int:
    from sw_hooks.core.access import oriented_shape

    return int(oriented_shape(linear)[1])


def list_expert_linears(entries: list[ExpertEntry]) -> set[str]:
    """Names of the per-expert linears the list layout's entries cover (not recorded alone)."""
    names = set()
    for entry in entries:
        if entry.experts.layout == "list":
            parent, leaf = entry.name.rsplit(".", 1)
            names.update(f"{parent}.{e}.{leaf}" for e in range(entry.experts.num_experts))
    return names


def hook_experts(
    entries: list[ExpertEntry], hooks: Any, fold: Fold, token_mask: Callable[[], Any]
) -> None:
    """Register, into ``hooks``, what folds every experts call into ``entries``."""
    by_unit: dict[str, list[ExpertEntry]] = {}
    for entry in entries:
        by_unit.setdefault(entry.experts.name, []).append(entry)
    for group in by_unit.values():
        unit = group[0].experts
        if unit.layout == "fused":
            hooks.forward(unit.module, _fused_hook(unit, group, fold, token_mask), with_kwargs=True)
            continue
        for entry in group:
            leaf = entry.name.rsplit(".", 1)[1]
            for expert in range(unit.num_experts):
                linear = getattr(unit.module[expert], leaf)
                hooks.pre(linear, _list_hook(entry.name, expert, fold))


def _fused_hook(
    unit: ExpertsModule, group: list[ExpertEntry], fold: Fold, token_mask: Callable[[], Any]
):
    first = [e.name for e in group if not e.name.endswith(".down_proj")]
    down = f"{unit.name}.down_proj"

    def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], _: Any) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        index = args[1] if len(args) > 1 else kwargs["top_k_index"]
        hidden = hidden.detach().reshape(-1, hidden.shape[-1])
        index = index.reshape(hidden.shape[0], -1)
        mask = token_mask()
        if mask is not None and mask.numel() == index.shape[0]:
            # padding is routed like any token; route it nowhere for the record
            index = index.masked_fill(~mask.reshape(-1, 1).to(index.device), unit.num_experts)
        with torch.no_grad():
            for expert in torch.unique(index).tolist():
                if expert >= unit.num_experts:
                    continue
                rows = hidden[(index == expert).any(dim=-1)]
                for name in first:
                    fold(name, expert, rows)
                inner, _ = fused_down_projection(unit.module, rows, expert)
                fold(down, expert, inner)

    return record


def _list_hook(name: str, expert: int, fold: Fold):
    """An expert MLP's linear sees only its routed tokens, so no padding mask can apply."""

    def record(module: nn.Module, args: tuple[Any, ...]) -> None:
        if args and isinstance(args[0], torch.Tensor):
            x = args[0].detach()
            fold(name, expert, x.reshape(-1, x.shape[-1]))

    return record
