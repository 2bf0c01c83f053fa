"""Tiny mixture-of-experts models with planted expert super weights and super experts."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sw_hooks.testing.planting import PlantedModel, PlantedWeight, wire_lm_head
from sw_hooks.testing.tiny import config_kwargs

MOE_ARCHITECTURES: tuple[str, ...] = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")

_EXPERT_INTERMEDIATE = 64


def _moe_config_kwargs(arch: str, num_layers: int, num_experts: int, top_k: int) -> dict[str, Any]:
    base = config_kwargs("llama", num_layers, 256) | dict(num_experts_per_tok=top_k)
    if arch == "mixtral":
        return base | dict(num_local_experts=num_experts, intermediate_size=_EXPERT_INTERMEDIATE)
    moe = dict(num_experts=num_experts, moe_intermediate_size=_EXPERT_INTERMEDIATE)
    if arch == "olmoe":
        return base | dict(num_experts=num_experts, intermediate_size=_EXPERT_INTERMEDIATE)
    if arch == "qwen2_moe":
        return base | moe | dict(shared_expert_intermediate_size=_EXPERT_INTERMEDIATE)
    return base | moe


def tiny_moe_model(
    arch: str = "mixtral",
    *,
    num_layers: int = 4,
    num_experts: int = 8,
    top_k: int = 2,
    seed: int = 0,
) -> nn.Module:
    """A randomly initialised mixture-of-experts causal LM (fused experts, as transformers 5).

    Hidden size 64, expert intermediate size 64, untied unit-scale embeddings, eval mode.

    Example:
        >>> tuple(tiny_moe_model("mixtral", num_layers=1).model.layers[0].mlp.experts.down_proj.shape)
        (8, 64, 64)
    """
    if arch not in MOE_ARCHITECTURES:
        raise ValueError(f"unknown MoE architecture {arch!r}; choose one of {MOE_ARCHITECTURES}")
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(arch, **_moe_config_kwargs(arch, num_layers, num_experts, top_k))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        nn.init.normal_(model.get_input_embeddings().weight, std=1.0)
    return model.eval()


def _moe_block(model: nn.Module, layer: int) -> nn.Module:
    block = model.model.layers[layer].mlp
    if not hasattr(block, "gate") or not hasattr(block, "experts"):
        raise ValueError(f"layer {layer} has no mixture-of-experts block")
    return block


def _plant_in_expert(
    planted: PlantedModel,
    layer: int,
    expert: int,
    row: int,
    cols: list[int],
    trigger_token: int,
    target_token: int | None,
    value: float,
    drive: float,
) -> None:
    """Route ``trigger_token`` to ``expert`` and make its down-projection spike at ``row``."""
    net = planted.model
    block = _moe_block(net, layer)
    embedding = net.get_input_embeddings().weight.data
    hidden = embedding.shape[1]
    trigger_dim = hidden - 1 - (trigger_token % 8)
    if row >= hidden - 8:
        raise ValueError(f"row {row} collides with the trigger dimensions (the last 8 of {hidden})")
    experts = block.experts
    intermediate = experts.down_proj.shape[-1]
    with torch.no_grad():
        embedding[:, trigger_dim] = 0
        embedding[trigger_token] = 0
        embedding[trigger_token, trigger_dim] = hidden**0.5
        # The router sends the trigger (and only what carries its dimension) to `expert`.
        block.gate.weight[:, trigger_dim] = 0
        block.gate.weight[expert, trigger_dim] = 4.0
        for col in cols:
            for gate_up_row in (col, intermediate + col):
                experts.gate_up_proj[expert, gate_up_row].zero_()
                experts.gate_up_proj[expert, gate_up_row, trigger_dim] = drive
            experts.down_proj[expert, :, col] = 0
            experts.down_proj[expert, row, col] = value / len(cols)
        wire_lm_head(net, row, target_token)
    name = f"model.layers.{layer}.mlp.experts.down_proj"
    planted.planted.append(
        PlantedWeight(name, layer, row, cols[0], value, trigger_token, target_token, expert)
    )


def plant_expert_super_weight(
    model: nn.Module | PlantedModel,
    layer: int,
    expert: int,
    row: int,
    col: int,
    *,
    trigger_token: int,
    target_token: int | None = None,
    value: float = 8.0,
    drive: float = 3.0,
) -> PlantedModel:
    """Make ``experts.down_proj[expert, row, col]`` of ``layers[layer]`` a super weight.

    As :func:`plant_super_weight`, and the router sends the trigger token to ``expert``.
    """
    planted = model if isinstance(model, PlantedModel) else PlantedModel(model)
    _plant_in_expert(planted, layer, expert, row, [col], trigger_token, target_token, value, drive)
    return planted


def plant_super_expert(
    model: nn.Module | PlantedModel,
    layer: int,
    expert: int,
    row: int,
    cols: list[int],
    *,
    trigger_token: int,
    target_token: int | None = None,
    value: float = 8.0,
    drive: float = 3.0,
) -> PlantedModel:
    """Make one expert massive with no single super weight: ``value`` spread over ``cols``.

    Each weight explains ``1 / len(cols)`` of the spike, so no one weight matters but the
    expert as a whole does: pruning it loses the super activation.
    """
    planted = model if isinstance(model, PlantedModel) else PlantedModel(model)
    _plant_in_expert(
        planted, layer, expert, row, list(cols), trigger_token, target_token, value, drive
    )
    return planted


def planted_moe(arch: str = "mixtral", num_layers: int = 4, **kwargs: Any) -> PlantedModel:
    """The MoE fixture: a super weight in layer 1 expert 3 ``[5, 17]`` and a super expert in
    layer 2 expert 6 (row 9, spread over input channels 40..47), both causal."""
    planted = plant_expert_super_weight(
        tiny_moe_model(arch, num_layers=num_layers, **kwargs),
        1,
        3,
        5,
        17,
        trigger_token=1,
        target_token=2,
    )
    return plant_super_expert(
        planted, 2, 6, 9, list(range(40, 48)), trigger_token=3, target_token=4
    )


class ExpertMLP(nn.Module):
    """One expert as its own gated MLP (the list layout's unit)."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, act_fn: Any):
        super().__init__()
        self.gate_proj = nn.Linear(gate.shape[1], gate.shape[0], bias=False)
        self.up_proj = nn.Linear(up.shape[1], up.shape[0], bias=False)
        self.down_proj = nn.Linear(down.shape[1], down.shape[0], bias=False)
        with torch.no_grad():
            for linear, weight in (
                (self.gate_proj, gate),
                (self.up_proj, up),
                (self.down_proj, down),
            ):
                linear.weight.copy_(weight)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class ListExperts(nn.ModuleList):
    """Experts as a ``ModuleList`` of MLPs, called like transformers' fused experts."""

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for expert in top_k_index.unique().tolist():
            if not 0 <= expert < len(self):
                continue
            token, slot = torch.where(top_k_index == expert)
            routed = self[expert](hidden_states[token]) * top_k_weights[token, slot, None]
            out.index_add_(0, token, routed.to(out.dtype))
        return out


def to_expert_list(model: nn.Module) -> nn.Module:
    """Rebuild every fused experts module as a :class:`ListExperts` holding the same weights."""
    for block in (layer.mlp for layer in model.model.layers):
        fused = getattr(block, "experts", None)
        if fused is None or isinstance(fused, ListExperts):
            continue
        half = fused.gate_up_proj.shape[1] // 2
        block.experts = ListExperts(
            ExpertMLP(
                fused.gate_up_proj.data[e, :half],
                fused.gate_up_proj.data[e, half:],
                fused.down_proj.data[e],
                fused.act_fn,
            )
            for e in range(fused.down_proj.shape[0])
        )
    return model
