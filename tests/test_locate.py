import re

import pytest
import torch
from torch import nn

from sw_hooks.core.access import WeightElement, oriented_shape
from sw_hooks.core.locate import find_down_projections, is_transposed, layer_index
from sw_hooks.testing import ARCHITECTURES, tiny_model

EXPECTED_LEAF = {
    "gpt2": "mlp.c_proj",
    "gpt_neox": "mlp.dense_4h_to_h",
    "falcon": "mlp.dense_4h_to_h",
    "opt": "fc2",
}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_finds_one_down_projection_per_layer_in_order(arch):
    found = find_down_projections(tiny_model(arch, num_layers=3))
    assert [layer_index(n) for n in found] == [0, 1, 2]
    leaf = EXPECTED_LEAF.get(arch, "mlp.down_proj")
    assert all(name.endswith(leaf) for name in found)
    for module in found.values():
        assert oriented_shape(module) == (64, 128)  # [hidden out, intermediate in]


def test_gpt2_conv1d_is_transposed_and_addressed_out_in():
    model = tiny_model("gpt2", num_layers=1)
    name, module = next(iter(find_down_projections(model).items()))
    assert is_transposed(module) and module.weight.shape == (128, 64)
    element = WeightElement.resolve(model, (name, 7, 100))
    assert element.storage_index == (100, 7)
    assert element.read() == module.weight[100, 7]


def test_layer_index_takes_first_number():
    assert layer_index("model.layers.12.mlp.down_proj") == 12
    assert layer_index("model.layers.3.block_sparse_moe.experts.5.w2") == 3
    assert layer_index("lm_head") is None


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"ffn_in": nn.Linear(4, 8), "ffn_out": nn.Linear(8, 4)})
            for _ in range(12)
        )


def test_user_glob_and_regex_order_by_layer_number_not_text():
    model = Custom()
    by_glob = find_down_projections(model, "blocks.*.ffn_out")
    assert [layer_index(n) for n in by_glob] == list(range(12))  # 2 before 10
    by_regex = find_down_projections(model, re.compile(r"blocks\.1\d?\.ffn_out$"))
    assert list(by_regex) == ["blocks.1.ffn_out", "blocks.10.ffn_out", "blocks.11.ffn_out"]


def test_no_match_lists_what_it_saw():
    with pytest.raises(ValueError) as error:
        find_down_projections(Custom())
    message = str(error.value)
    assert "blocks.*.ffn_in" in message and "blocks.*.ffn_out" in message and "pattern=" in message


def test_bad_input_types():
    with pytest.raises(TypeError, match="nn.Module"):
        find_down_projections("not a model")
    with pytest.raises(TypeError, match="pattern"):
        find_down_projections(Custom(), pattern=3)


def test_out_of_range_coordinate_is_named():
    model = tiny_model("llama", num_layers=1)
    with pytest.raises(
        ValueError, match=r"outside model.layers.0.mlp.down_proj.weight.*\[64, 128\]"
    ):
        WeightElement.resolve(model, ("model.layers.0.mlp.down_proj", 64, 0))
    with pytest.raises(ValueError, match="no module named"):
        WeightElement.resolve(model, ("model.layers.9.mlp.down_proj", 0, 0))
    assert torch.equal(
        WeightElement.resolve(model, ("model.layers.0.mlp.down_proj", 63, 127)).read(),
        model.model.layers[0].mlp.down_proj.weight[63, 127],
    )


def test_the_result_says_how_each_module_was_found():
    by_name = find_down_projections(tiny_model("gpt2", num_layers=2))
    assert by_name.found_by == dict.fromkeys(
        ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"], "name"
    )
    by_glob = find_down_projections(Custom(), "blocks.1?.ffn_out")
    assert by_glob.found_by == dict.fromkeys(["blocks.10.ffn_out", "blocks.11.ffn_out"], "pattern")
