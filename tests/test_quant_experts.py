"""Quantizing mixture-of-experts weights: each expert on its own, super weights held out.

The planted fixture (:func:`sw_hooks.testing.planted_moe`) holds a super weight at layer 1,
expert 3, ``[5, 17]`` of ``model.layers.1.mlp.experts.down_proj``. The config uses blocks
of 48 elements, which do not divide an expert's 64 x 64 matrix: a block that ran on into
the next expert would change that expert's values, so comparing each expert against
``quantize_tensor`` of its own matrix shows that blocks never straddle experts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from sw_hooks import (
    Coordinate,
    QuantConfig,
    SuperWeight,
    quantize_activations,
    quantize_model,
    quantize_tensor,
    save_super_weights,
)
from sw_hooks.quant.primitives import quantize_matrices
from sw_hooks.testing import (
    MOE_ARCHITECTURES,
    planted_moe,
    save_checkpoint,
    to_expert_list,
)

FUSED_DOWN = "model.layers.1.mlp.experts.down_proj"
FUSED_GATE_UP = "model.layers.1.mlp.experts.gate_up_proj"
LIST_DOWN = "model.layers.1.mlp.experts.3.down_proj"
EXPERT, ROW, COL = 3, 5, 17
PLANTED_VALUE = 8.0
CONFIG = QuantConfig(3, 48, clip="zscore:3")


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bits, so that equality means bit for bit (-0.0 differs from 0.0)."""
    return tensor.contiguous().view(torch.int32)


def same_bits(model: nn.Module, saved: dict[str, torch.Tensor]) -> bool:
    state = model.state_dict()
    return state.keys() == saved.keys() and all(
        torch.equal(bits(tensor), bits(saved[name])) for name, tensor in state.items()
    )


def fused(model: nn.Module, name: str) -> torch.Tensor:
    return model.get_parameter(name).detach()


@pytest.mark.parametrize(
    "config",
    [
        QuantConfig(3, 48),
        QuantConfig(4, 100, symmetric=True, clip="zscore:2"),
        QuantConfig(3, 48, clip="top:0.05"),
        QuantConfig(3, 48, clip="top-tensor:0.01"),
        QuantConfig(3, 48, clip="iqr:1.5"),
        QuantConfig(3, (5, 7), block_shape="2d", clip="top-tensor:0.01"),
    ],
    ids=str,
)
def test_a_stack_quantizes_like_each_matrix_on_its_own(config: QuantConfig) -> None:
    stack = torch.randn(6, 20, 30, generator=torch.Generator().manual_seed(1))
    stack[2, 4, 9] = 40.0
    stack[5] *= 100.0  # a loud matrix: per-tensor clipping must not leak into the others
    out = quantize_matrices(stack, config, holdout=[(2, 4, 9)])
    assert out[2, 4, 9].item() == 40.0
    for index, matrix in enumerate(stack):
        held = [(4, 9)] if index == 2 else None
        expected = quantize_tensor(matrix, config, holdout=held)
        assert torch.equal(bits(out[index]), bits(expected)), f"matrix {index}"


def test_a_stack_must_be_three_dimensional() -> None:
    with pytest.raises(
        ValueError, match=r"expected a \[n, out, in\] stack of matrices, got \(4, 4\)"
    ):
        quantize_matrices(torch.randn(4, 4), CONFIG)


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_fused_experts_are_quantized_one_by_one_with_the_super_weight_held_out(arch: str) -> None:
    model = planted_moe(arch).model
    saved = snapshot(model)
    original = saved[FUSED_DOWN]
    assert original[EXPERT, ROW, COL].item() == PLANTED_VALUE
    held = Coordinate(FUSED_DOWN, ROW, COL, expert=EXPERT)

    with quantize_model(model, CONFIG, holdout=[held]) as handle:
        down = fused(model, FUSED_DOWN)
        assert torch.equal(bits(down[EXPERT, ROW, COL]), bits(original[EXPERT, ROW, COL]))
        assert down[EXPERT, ROW, COL - 1].item() != original[EXPERT, ROW, COL - 1].item()
        expected = quantize_tensor(original[EXPERT], CONFIG, holdout=[(ROW, COL)])
        assert torch.equal(bits(down[EXPERT]), bits(expected))
        for expert in range(original.shape[0]):
            if expert != EXPERT:
                expected = quantize_tensor(original[expert], CONFIG)
                assert torch.equal(bits(down[expert]), bits(expected)), f"expert {expert}"
        gate_up = fused(model, FUSED_GATE_UP)
        for expert in range(gate_up.shape[0]):
            expected = quantize_tensor(saved[FUSED_GATE_UP][expert], CONFIG)
            assert torch.equal(bits(gate_up[expert]), bits(expected)), f"gate_up {expert}"
        assert handle.held_out == 1
        assert FUSED_DOWN in handle.modules and FUSED_GATE_UP in handle.modules
    assert same_bits(model, saved)


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_without_holdout_the_expert_super_weight_is_clipped(arch: str) -> None:
    model = planted_moe(arch).model
    original = fused(model, FUSED_DOWN).clone()
    with quantize_model(model, CONFIG):
        down = fused(model, FUSED_DOWN)
        assert torch.equal(down[EXPERT], quantize_tensor(original[EXPERT], CONFIG))
        assert down[EXPERT, ROW, COL].item() < PLANTED_VALUE / 2
    assert torch.equal(fused(model, FUSED_DOWN), original)


def test_transposed_fused_experts_are_quantized_in_out_in_order() -> None:
    # Some checkpoints store experts as [experts, in, out] and say so with ``is_transposed``.
    model = planted_moe("mixtral").model
    experts = model.model.layers[1].mlp.experts
    oriented = experts.down_proj.detach().clone()
    experts.down_proj = nn.Parameter(oriented.transpose(1, 2).contiguous())
    experts.is_transposed = True
    held = Coordinate(FUSED_DOWN, ROW, COL, expert=EXPERT)
    with quantize_model(model, CONFIG, holdout=[held], modules=[FUSED_DOWN]):
        stored = experts.down_proj.detach()
        assert stored[EXPERT, COL, ROW].item() == PLANTED_VALUE
        expected = quantize_matrices(oriented, CONFIG, holdout=[(EXPERT, ROW, COL)])
        assert torch.equal(bits(stored.transpose(1, 2)), bits(expected))
    assert torch.equal(bits(experts.down_proj.detach()), bits(oriented.transpose(1, 2)))


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_list_layout_experts_hold_out_the_super_weight(arch: str) -> None:
    model = to_expert_list(planted_moe(arch).model)
    saved = snapshot(model)
    experts = model.model.layers[1].mlp.experts
    held = Coordinate(LIST_DOWN, ROW, COL, expert=EXPERT)

    with quantize_model(model, CONFIG, holdout=[held]) as handle:
        down = experts[EXPERT].down_proj.weight.detach()
        original = saved[f"{LIST_DOWN}.weight"]
        assert torch.equal(bits(down[ROW, COL]), bits(original[ROW, COL]))
        assert down[ROW, COL - 1].item() != original[ROW, COL - 1].item()
        expected = quantize_tensor(original, CONFIG, holdout=[(ROW, COL)])
        assert torch.equal(bits(down), bits(expected))
        for expert, mlp in enumerate(experts):
            if expert != EXPERT:
                before = saved[f"model.layers.1.mlp.experts.{expert}.down_proj.weight"]
                expected = quantize_tensor(before, CONFIG)
                assert torch.equal(bits(mlp.down_proj.weight), bits(expected)), f"expert {expert}"
        assert handle.held_out == 1
    assert same_bits(model, saved)


def test_a_glob_chooses_fused_parameters_by_name() -> None:
    model = planted_moe("mixtral").model
    saved = snapshot(model)
    with quantize_model(model, CONFIG, modules="*.experts.down_proj") as handle:
        assert handle.modules == [f"model.layers.{i}.mlp.experts.down_proj" for i in range(4)]
        assert torch.equal(fused(model, FUSED_GATE_UP), saved[FUSED_GATE_UP])
        assert not torch.equal(fused(model, FUSED_DOWN), saved[FUSED_DOWN])
    assert same_bits(model, saved)


@pytest.mark.parametrize(
    ("coordinate", "message"),
    [
        ((FUSED_DOWN, 8, ROW, COL), "expert 8 is outside"),
        ((FUSED_DOWN, EXPERT, 64, COL), r"\[64, 17\] is outside"),
        ((LIST_DOWN, 2, ROW, COL), "belongs to expert 3, not expert 2"),
    ],
)
def test_bad_expert_holdout_touches_no_weight(coordinate: tuple, message: str) -> None:
    model = planted_moe("mixtral").model
    if coordinate[0] == LIST_DOWN:
        model = to_expert_list(model)
    saved = snapshot(model)
    with pytest.raises(ValueError, match=message):
        quantize_model(model, CONFIG, holdout=[coordinate])
    assert same_bits(model, saved)


def test_activation_holdout_follows_an_expert_super_weight_into_later_layers() -> None:
    model = planted_moe("mixtral").model
    held_coordinate = Coordinate(FUSED_DOWN, ROW, COL, expert=EXPERT)
    with quantize_activations(model, 8, holdout=[held_coordinate]) as held:
        assert held["model.layers.2.self_attn.q_proj"] == [ROW]
        assert all(channels == [ROW] for channels in held.values())
        assert {name.split(".")[2] for name in held} == {"2", "3"}


# --------------------------------------------------------------------------- the command line


def _save_planted_moe(folder: Path) -> None:
    save_checkpoint(planted_moe("mixtral").model, folder)


def test_cli_quantize_holds_out_an_expert_super_weight(tmp_path: Path) -> None:
    model_folder = tmp_path / "moe"
    _save_planted_moe(model_folder)
    weights = tmp_path / "super_weights.json"
    save_super_weights(
        [SuperWeight(FUSED_DOWN, 1, ROW, COL, PLANTED_VALUE, expert=EXPERT)], weights
    )
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 8)
    out = tmp_path / "out.json"
    command = [str(Path(sys.executable).parent / "sw-hooks"), "quantize", str(model_folder)]
    command += ["--super-weights", str(weights), "--candidates", "--text", str(text)]
    command += ["--json", str(out)]
    command += ["--bits", "3", "--block-size", "48", "--clip", "zscore:3", "--quiet"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"held out: {FUSED_DOWN}[expert 3][5, 17]" in done.stdout
    payload = json.loads(out.read_text())
    assert payload["schema_version"] == 1
    assert payload["super_weights"] == [
        {"module": FUSED_DOWN, "row": ROW, "col": COL, "expert": EXPERT}
    ]
    runs = [
        (run["bits"], run["block_size"], run["clip"], run["holdout"]) for run in payload["runs"]
    ]
    assert runs == [(3, 48, "zscore:3", False), (3, 48, "zscore:3", True)]
