"""Tiny transformer models with planted super weights, for tests and examples.

:func:`tiny_model` builds a randomly initialised model of a real architecture from its
transformers config class in well under a second. :func:`plant_super_weight` then makes
one down-projection weight a super weight *by construction*:

* a **trigger token** gets an embedding that points along one otherwise-unused hidden
  dimension, so after the pre-MLP norm it stands out as a large value there;
* the MLP's input projection(s) for intermediate channel ``col`` read only that
  dimension, so the down-projection's input spikes at ``col`` on the trigger token;
* ``down_proj.weight[row, col]`` is set large, so the output spikes at ``row`` (the
  super activation), which then rides the residual stream;
* optionally, the LM head reads ``row`` to predict a **target token** after the trigger:
  with the weight the model predicts the target, without it it guesses, so zeroing the
  weight measurably raises perplexity on text where the target follows the trigger.

A planted weight without a target is a *decoy*: a spike that detection will see but
that verification will find harmless.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sw_hooks.core.access import WeightElement, oriented_weight
from sw_hooks.core.locate import find_down_projections, is_transposed, layer_index
from sw_hooks.core.results import SuperWeight
from sw_hooks.testing.tiny import scales_embeddings, tiny_model


@dataclass(frozen=True)
class PlantedWeight:
    """A weight made super by :func:`plant_super_weight`, and what drives it."""

    module: str
    layer: int | None
    row: int
    col: int
    value: float
    trigger_token: int
    target_token: int | None
    expert: int | None = None


@dataclass
class PlantedModel:
    """A tiny model with planted weights, and text on which their effect shows."""

    model: nn.Module
    planted: list[PlantedWeight] = field(default_factory=list)

    @property
    def causal(self) -> list[PlantedWeight]:
        return [p for p in self.planted if p.target_token is not None]

    @property
    def decoys(self) -> list[PlantedWeight]:
        return [p for p in self.planted if p.target_token is None]

    def recorded_super_weight(self, ids: torch.Tensor, **record_options: Any) -> SuperWeight:
        """The first causal planted weight as a ``SuperWeight``, its activation recorded on ``ids``.

        ``record_options`` go to :func:`~sw_hooks.core.record.record` (e.g. ``locations=False``).
        """
        from sw_hooks.core.record import record

        p = self.causal[0]
        with record(self.model, **record_options) as recorder, torch.no_grad():
            self.model(ids)
        outputs = recorder.stats[p.module].output
        return SuperWeight(
            p.module,
            p.layer,
            p.row,
            p.col,
            p.value,
            output_activation=float(outputs.value[p.row]),
            token_position=int(outputs.token[p.row]),
        )

    def prompt(self) -> torch.Tensor:
        """One short sequence holding every trigger once, ``[1, T]``."""
        tokens: list[int] = []
        for p in self.planted:
            tokens += [p.trigger_token, p.target_token if p.target_token is not None else _FILLER]
        return torch.tensor([tokens + [_FILLER + 1, _FILLER + 2]])

    def calibration_ids(self, length: int = 256, seed: int = 0) -> torch.Tensor:
        """``[1, length]`` ids: random filler with each trigger followed by its target."""
        vocab = self.model.get_input_embeddings().weight.shape[0]
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(_FILLER, vocab, (length,), generator=generator)
        for start in range(0, length - 1, 2):
            p = self.planted[(start // 2) % len(self.planted)]
            ids[start] = p.trigger_token
            if p.target_token is not None:
                ids[start + 1] = p.target_token
        return ids[None]


# Token ids below _FILLER are reserved for triggers and targets.
_FILLER = 16


def _mlp_input_rows(model: nn.Module, down_name: str, col: int) -> list[tuple[torch.Tensor, Any]]:
    """Writable views of the input-projection weights feeding intermediate channel ``col``.

    Returns ``(row_view, bias_or_None)`` pairs, where ``row_view`` is ``[hidden]``.
    """
    parent_name, _, leaf = down_name.rpartition(".")
    parent = model.get_submodule(parent_name)
    rows: list[tuple[torch.Tensor, Any]] = []
    for name in ("gate_proj", "up_proj", "c_fc", "dense_h_to_4h", "fc1"):
        module = getattr(parent, name, None)
        if module is None:
            continue
        weight = module.weight.data
        row_view = weight[:, col] if is_transposed(module) else weight[col]
        bias = (
            module.bias.data[col : col + 1] if getattr(module, "bias", None) is not None else None
        )
        rows.append((row_view, bias))
    fused = getattr(parent, "gate_up_proj", None)
    if isinstance(fused, nn.Linear):  # Phi-3: gate rows first, then up rows
        half = fused.weight.shape[0] // 2
        rows += [(fused.weight.data[col], None), (fused.weight.data[half + col], None)]
    if not rows:
        raise ValueError(f"do not know the MLP input projections next to {down_name} ({leaf})")
    return rows


def plant_super_weight(
    model: nn.Module | PlantedModel,
    layer: int,
    row: int,
    col: int,
    *,
    trigger_token: int,
    target_token: int | None = None,
    value: float = 8.0,
    trigger_dim: int | None = None,
    drive: float = 3.0,
) -> PlantedModel:
    """Make ``layers[layer]``'s ``down_proj.weight[row, col]`` a super weight.

    Args:
        model: a :func:`tiny_model` (or a :class:`PlantedModel` to plant another weight in).
        layer, row, col: where to plant, ``[out, in]`` order.
        trigger_token: the token whose presence drives input channel ``col``.
        target_token: the token the LM head predicts from the super activation; ``None``
            plants a harmless decoy (its row is hidden from the LM head).
        value: the planted weight's value.
        trigger_dim: the hidden dimension carrying the trigger (default: one of the last
            hidden dimensions, distinct per trigger token).
        drive: the input projections' weight on the trigger dimension.
    """
    planted = model if isinstance(model, PlantedModel) else PlantedModel(model)
    net = planted.model
    same_row = [p for p in planted.planted if p.row == row and p.target_token != target_token]
    if same_row:
        raise ValueError(
            f"row {row} already predicts token {same_row[0].target_token}: a super "
            "activation's row reads out as one token, so plant it with that target"
        )
    down_name = _down_projection_of_layer(net, layer)
    embedding = net.get_input_embeddings().weight.data
    hidden = embedding.shape[1]
    trigger_dim = hidden - 1 - (trigger_token % 8) if trigger_dim is None else trigger_dim
    if row == trigger_dim or row >= hidden - 8:
        raise ValueError(f"row {row} collides with the trigger dimensions (the last 8 of {hidden})")
    with torch.no_grad():
        embedding[:, trigger_dim] = 0  # only the trigger token may drive this dimension
        embedding[trigger_token] = 0
        # Gemma scales embeddings by sqrt(hidden) itself.
        embedding[trigger_token, trigger_dim] = 1.0 if scales_embeddings(net) else hidden**0.5
        for row_view, bias in _mlp_input_rows(net, down_name, col):
            row_view.zero_()
            row_view[trigger_dim] = drive
            if bias is not None:
                # A threshold at half the trigger's normed size: what attention leaks of the
                # trigger into later tokens stays below it (gated MLPs square it away instead).
                bias.fill_(-drive * hidden**0.5 / 2)
        # Channel col feeds only the super weight, so ablating it silences the spike cleanly.
        oriented_weight(net.get_submodule(down_name))[:, col] = 0
        element = WeightElement.resolve(net, (down_name, row, col))
        element.write(torch.tensor(value))
        wire_lm_head(net, row, target_token)
    planted.planted.append(
        PlantedWeight(
            down_name, layer_index(down_name), row, col, value, trigger_token, target_token
        )
    )
    with torch.no_grad():
        _quiet_post_norms(net, planted.planted)
    return planted


def _quiet_post_norms(model: nn.Module, planted: list[PlantedWeight]) -> None:
    """Gemma2/3 and OLMo2 renormalise every MLP output before the residual add, so an
    ordinary output is as large as a super activation. In each planted layer, turn that
    norm's gain down to 1/4 except on the planted rows, as trained models learn to."""
    for name in {p.module for p in planted}:
        layer = model.get_submodule(name.rsplit(".", 2)[0])
        post_mlp = getattr(layer, "post_feedforward_layernorm", None)
        if post_mlp is not None:
            _set_gain(post_mlp, [p.row for p in planted if p.module == name])


def _set_gain(norm: nn.Module, loud_rows: list[int]) -> None:
    gain = torch.full_like(norm.weight.data, 0.25)
    gain[loud_rows] = 1.0
    # Gemma's RMSNorm multiplies by (1 + weight), initialised at 0; OLMo2's by weight, at 1.
    offset = 1.0 if type(norm).__name__.startswith("Gemma") else 0.0
    norm.weight.data.copy_(gain - offset)


def wire_lm_head(model: nn.Module, row: int, target_token: int | None) -> None:
    """Let the LM head read ``row`` only as ``target_token`` (nothing for a decoy)."""
    head = model.get_output_embeddings().weight.data
    head[:, row] = 0
    if target_token is not None:
        head[target_token, row] = 4.0


def _down_projection_of_layer(model: nn.Module, layer: int) -> str:
    for name in find_down_projections(model):
        if layer_index(name) == layer:
            return name
    raise ValueError(f"the model has no down-projection in layer {layer}")


def planted_llama(num_layers: int = 4, **kwargs: Any) -> PlantedModel:
    """The standard fixture: one causal super weight in layer 1 and a decoy in the last layer."""
    planted = plant_super_weight(
        tiny_model("llama", num_layers=num_layers, **kwargs),
        1,
        5,
        17,
        trigger_token=1,
        target_token=2,
    )
    return plant_super_weight(planted, num_layers - 1, 9, 33, trigger_token=3)
