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

ARCHITECTURES: tuple[str, ...] = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi3",
    "olmo",
    "olmo2",
    "gpt2",
    "gpt_neox",
    "opt",
    "falcon",
)

_HIDDEN, _INTERMEDIATE, _HEADS = 64, 128, 4


def _config_kwargs(arch: str, num_layers: int, vocab_size: int) -> dict[str, Any]:
    common = dict(
        vocab_size=vocab_size,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
    )
    llama_like = dict(
        hidden_size=_HIDDEN,
        intermediate_size=_INTERMEDIATE,
        num_hidden_layers=num_layers,
        num_attention_heads=_HEADS,
        num_key_value_heads=_HEADS,
        max_position_embeddings=512,
    )
    if arch == "gpt2":
        return common | dict(
            n_embd=_HIDDEN,
            n_inner=_INTERMEDIATE,
            n_layer=num_layers,
            n_head=_HEADS,
            n_positions=512,
        )
    if arch == "gpt_neox":
        return common | dict(
            hidden_size=_HIDDEN,
            intermediate_size=_INTERMEDIATE,
            num_hidden_layers=num_layers,
            num_attention_heads=_HEADS,
            max_position_embeddings=512,
        )
    if arch == "opt":
        return common | dict(
            hidden_size=_HIDDEN,
            ffn_dim=_INTERMEDIATE,
            num_hidden_layers=num_layers,
            num_attention_heads=_HEADS,
            word_embed_proj_dim=_HIDDEN,
            max_position_embeddings=512,
        )
    if arch == "falcon":
        return common | dict(
            hidden_size=_HIDDEN,
            ffn_hidden_size=_INTERMEDIATE,
            num_hidden_layers=num_layers,
            num_attention_heads=_HEADS,
            new_decoder_architecture=False,
            multi_query=False,
            alibi=False,
            bias=True,
        )
    if arch in ("gemma", "gemma2", "gemma3_text"):
        return common | llama_like | dict(head_dim=_HIDDEN // _HEADS)
    return common | llama_like


def tiny_model(
    arch: str = "llama",
    *,
    num_layers: int = 4,
    vocab_size: int = 256,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """A randomly initialised causal LM of a real architecture, small enough for unit tests.

    Hidden size 64, intermediate size 128, untied embeddings, eval mode.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {ARCHITECTURES}")
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(arch, **_config_kwargs(arch, num_layers, vocab_size))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        # Unit-scale embeddings, as in trained models: with the default 0.02 the residual
        # is so small that norms amplify whatever attention leaks into it.
        if not _scales_embeddings(model):
            nn.init.normal_(model.get_input_embeddings().weight, std=1.0)
    return model.to(dtype).eval()


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
        embedding[trigger_token, trigger_dim] = 1.0 if _scales_embeddings(net) else hidden**0.5
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
        _wire_lm_head(net, row, target_token)
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


def _scales_embeddings(model: nn.Module) -> bool:
    return getattr(model.config, "model_type", "").startswith("gemma")


def _wire_lm_head(model: nn.Module, row: int, target_token: int | None) -> None:
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


# -- mixture-of-experts models -------------------------------------------------------------
MOE_ARCHITECTURES: tuple[str, ...] = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")

_EXPERT_INTERMEDIATE = 64


def _moe_config_kwargs(arch: str, num_layers: int, num_experts: int, top_k: int) -> dict[str, Any]:
    base = _config_kwargs("llama", num_layers, 256) | dict(num_experts_per_tok=top_k)
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
        _wire_lm_head(net, row, target_token)
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


def byte_tokenizer() -> Any:
    """A 256-token byte-level tokenizer built locally: any text, nothing downloaded.

    For tiny test models saved as checkpoints (``tokenizer.save_pretrained(folder)``), so
    that :func:`sw_hooks.models.load_model` and the CLI can load them like real ones.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=alphabet[0], eos_token=alphabet[0]
    )
