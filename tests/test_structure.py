"""Locating MLP output projections by the structure of the data flow."""

import re

import pytest
import torch
from torch import nn

from sw_hooks.core.locate import find_down_projections
from sw_hooks.core.structure import (
    example_input,
    feeding_linears,
    find_output_projections,
    trace_linears,
)
from sw_hooks.testing import ARCHITECTURES, HandWritten, family_input, tiny_family, tiny_model


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_structure_agrees_with_the_name_table(arch):
    model = tiny_model(arch, num_layers=2)
    by_name = find_down_projections(model)
    assert set(by_name.found_by.values()) == {"name"}
    assert find_output_projections(model) == list(by_name)


class Gated(nn.Module):
    """``down(act(gate(x)) * up(x))`` in blocks, with names no table knows."""

    def __init__(self, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 8)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "norm": nn.RMSNorm(8),
                    "g": nn.Linear(8, 16, bias=False),
                    "u": nn.Linear(8, 16, bias=False),
                    "d": nn.Linear(16, 8, bias=False),
                    "side": nn.Linear(16, 8, bias=False),
                }
            )
            for _ in range(layers)
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for b in self.blocks:
            h = nn.functional.silu(b["g"](b["norm"](x))) * b["u"](b["norm"](x))
            x = x + b["d"](h)
            _ = b["side"](h)  # reads the activation but never reaches the residual stream
        return x


def test_gated_blocks_are_found_and_a_dead_end_branch_is_not():
    found = find_down_projections(Gated(), example_input=torch.tensor([[1, 2, 3]]))
    assert list(found) == ["blocks.0.d", "blocks.1.d"]
    assert found.found_by == {"blocks.0.d": "structure", "blocks.1.d": "structure"}


def test_feeding_linears_are_the_input_projections():
    ids = torch.tensor([[1, 2, 3]])
    assert feeding_linears(Gated(), "blocks.1.d", (ids,)) == ["blocks.1.g", "blocks.1.u"]
    fused = tiny_model("phi3", num_layers=1)
    assert feeding_linears(fused, "model.layers.0.mlp.down_proj", example_input(fused)) == [
        "model.layers.0.mlp.gate_up_proj"
    ]
    with pytest.raises(ValueError, match="blocks.0.g does not read a pointwise function"):
        feeding_linears(Gated(), "blocks.0.g", (ids,))


class Narrowing(nn.Module):
    """A residual MLP whose "down" projection is not narrower than its input: no match."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(8, 16)
        self.fc1, self.fc2 = nn.Linear(16, 8), nn.Linear(8, 16)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        return x + self.fc2(torch.relu(self.fc1(x)))


class NoResidual(nn.Module):
    """``fc2(act(fc1(x)))`` whose output replaces the stream instead of being added."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(8, 8)
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(self.embed(ids))))


@pytest.mark.parametrize("model", [Narrowing(), NoResidual()], ids=["narrowing", "no-residual"])
def test_each_criterion_rules_out_a_near_miss(model):
    assert find_output_projections(model, torch.tensor([[1, 2]])) == []
    with pytest.raises(ValueError, match=r"None by structure either\."):
        find_down_projections(model, example_input=torch.tensor([[1, 2]]))


def test_a_model_without_config_needs_an_example_input():
    with pytest.raises(ValueError) as error:
        find_down_projections(HandWritten())
    message = str(error.value)
    assert "no MLP down-projection of a known architecture in HandWritten" in message
    assert "blocks.*.narrow" in message and "pass example_input=" in message
    assert "\n" not in message


def test_bad_example_inputs_are_refused_with_one_clear_error():
    with pytest.raises(TypeError, match="example_input must be a tensor.*got int"):
        find_down_projections(HandWritten(), example_input=3)
    with pytest.raises(ValueError, match=r"traced forward of HandWritten.*failed \(TypeError"):
        find_output_projections(HandWritten(), {"wrong": torch.tensor([[1]])})


def test_trace_restores_training_mode_and_leaves_no_hooks():
    model = HandWritten().train()
    trace_linears(model, family_input(model))
    assert all(m.training for m in model.modules())
    assert all(not m._forward_hooks for m in model.modules())


def test_the_answer_is_kept_until_the_modules_change(monkeypatch):
    import sw_hooks.core.structure as structure

    traced = []
    real_trace = structure.trace_linears
    monkeypatch.setattr(structure, "trace_linears", lambda *a: traced.append(1) or real_trace(*a))
    model, ids = Gated(), torch.tensor([[1, 2]])
    assert find_output_projections(model, ids) == ["blocks.0.d", "blocks.1.d"]
    assert find_output_projections(model, ids) == ["blocks.0.d", "blocks.1.d"]
    assert len(traced) == 1
    model.blocks[1]["d"] = nn.Linear(16, 8)  # a replaced module invalidates the answer
    assert find_output_projections(model, ids) == ["blocks.0.d", "blocks.1.d"]
    assert len(traced) == 2


def test_check_structure_warns_when_a_pattern_like_name_is_not_an_output_projection():
    class Misnamed(nn.Module):
        """``mlp.down_proj`` by name, but its input is the embedding, not an activation."""

        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(8, 16)
            self.layers = nn.ModuleList(nn.Module() for _ in range(1))
            self.layers[0].mlp = nn.Module()
            self.layers[0].mlp.down_proj = nn.Linear(16, 8)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.layers[0].mlp.down_proj(self.embed(ids))

    model, ids = Misnamed(), torch.tensor([[1, 2]])
    assert list(find_down_projections(model)) == ["layers.0.mlp.down_proj"]
    with pytest.warns(UserWarning, match=re.escape("only by name ['layers.0.mlp.down_proj']")):
        find_down_projections(model, example_input=ids, check_structure=True)


def test_the_random_stream_is_untouched():
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    find_output_projections(tiny_family("vit", num_layers=1))  # draws a random image
    assert torch.equal(torch.rand(3), expected)
