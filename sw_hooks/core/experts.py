"""Mixture-of-experts layers: where they are, and one expert's down-projection recomputed.

A layer's experts come in one of two layouts, and both are supported:

* **fused** (transformers 5): one experts module holding 3-D parameters,
  ``down_proj`` ``[experts, hidden, intermediate]`` and ``gate_up_proj``
  ``[experts, 2 * intermediate, hidden]``, called as
  ``experts(hidden_states, top_k_index, top_k_weights)``. A weight is addressed as
  ``Coordinate("...mlp.experts.down_proj", row, col, expert)``.
* **list** (older checkpoints, other libraries): a ``ModuleList`` of per-expert MLPs,
  each with its own down-projection ``Linear``. A weight is addressed as
  ``Coordinate("...mlp.experts.3.down_proj", row, col, 3)``.

A recorded unit inside experts is ``Unit(coordinate module, expert)``, the same type a dense
down-projection's unit is (with ``expert=None``): everything downstream of the recorder is
written once for units.
"""

from __future__ import annotations

import inspect
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sw_hooks.core.locate import layer_index
from sw_hooks.core.maxima import ChannelStats, ExpertStats
from sw_hooks.core.units import Unit

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
        """Every expert's down-projection as a recorded unit."""
        return [Unit(self.coordinate_name(expert), expert) for expert in range(self.num_experts)]

    def routed_units(self, stats: ExpertStats) -> dict[Unit, ChannelStats]:
        """The experts that were routed to while ``stats`` was recorded, one unit each."""
        return {
            Unit(self.coordinate_name(expert), expert): stats.expert(expert)
            for expert in stats.tokens.nonzero().flatten().tolist()
        }

    def channels(self) -> tuple[int, int]:
        """``(in, out)`` channels of one expert's down-projection."""
        if self.layout == "list":
            out_features, in_features = self.expert_down_projection(0).weight.shape
            return int(in_features), int(out_features)
        _, first, second = self.module.down_proj.shape
        transposed = getattr(self.module, "is_transposed", False) is True
        return (int(first), int(second)) if transposed else (int(second), int(first))

    def owns(self, module: str) -> bool:
        """Whether ``module`` (an experts module or a coordinate's module) is these experts'."""
        return module == self.name or module.startswith(self.name + ".")


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


def find_experts(
    model: nn.Module, *, warn: bool = True, required: bool = True
) -> dict[str, ExpertsModule]:
    """Find every layer's experts, in either layout, ordered by layer.

    Modules that look like experts (``*experts``, ``*Moe*``, ``*MoE*``) but that cannot be
    hooked are named in a ``UserWarning``: their experts are not recorded.

    Raises:
        ValueError: the model has no experts this module can hook (unless ``required=False``,
            which returns an empty mapping).

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
    if not found and required:
        raise ValueError(
            f"no mixture-of-experts layers that can be hooked in {type(model).__name__}"
        )
    return dict(sorted(found.items(), key=lambda item: (item[1].layer or 0, item[0])))


def unhookable_experts(model: nn.Module, found: Mapping[str, ExpertsModule]) -> list[str]:
    """Names of expert-looking modules outside (and not around) any hookable experts module.

    A shared expert (``shared_expert``, ``shared_experts``) is a dense MLP every token goes
    through, recorded as a dense down-projection: not an experts module.
    """
    return [
        name
        for name, module in model.named_modules()
        if name
        and (_MOE_NAME.search(name.rsplit(".", 1)[-1]) or _MOE_CLASS.search(type(module).__name__))
        and not name.rsplit(".", 1)[-1].startswith("shared_expert")
        and not _inside(name, found)
    ]


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
