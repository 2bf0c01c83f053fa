import pytest
import torch

from sw_hooks.analysis.known import check_against_known, known_super_weights
from sw_hooks.analysis.magnitude import find_by_magnitude, largest_weights
from sw_hooks.core.results import SuperWeight
from sw_hooks.testing import tiny_model


def test_known_lookup_by_id_and_alias():
    assert [(k.layer, k.row, k.col) for k in known_super_weights("huggyllama/llama-7b")] == [
        (2, 3968, 7003)
    ]
    assert known_super_weights("Mistral-7B-v0.1") == known_super_weights(
        "mistralai/Mistral-7B-v0.1"
    )
    assert len(known_super_weights("meta-llama/Meta-Llama-3-8B")) == 3
    assert known_super_weights("nobody/unknown") == ()


def test_check_against_known():
    detected = [
        SuperWeight("model.layers.1.mlp.down_proj", 1, 2070, 7310, 1.0),
        SuperWeight("model.layers.5.mlp.down_proj", 5, 1, 2, 1.0),
    ]
    check = check_against_known("mistralai/Mistral-7B-v0.1", detected)
    assert [(k.layer, k.row, k.col) for k in check.confirmed] == [(1, 2070, 7310)]
    assert check.missed == () and [w.layer for w in check.new] == [5]
    assert check_against_known("nobody/unknown", detected) is None


def test_largest_weights_streams_and_excludes():
    model = tiny_model("llama", num_layers=2)
    down = model.model.layers[0].mlp.down_proj.weight
    with torch.no_grad():
        down[3, 4] = 50.0
        down[6, 7] = -40.0
    top = largest_weights(
        model, 1, modules={"model.layers.0.mlp.down_proj": model.model.layers[0].mlp.down_proj}
    )
    assert top == [("model.layers.0.mlp.down_proj", 3, 4)]
    top = largest_weights(
        model,
        1,
        modules={"model.layers.0.mlp.down_proj": model.model.layers[0].mlp.down_proj},
        exclude=[("model.layers.0.mlp.down_proj", 3, 4)],
    )
    assert top == [("model.layers.0.mlp.down_proj", 6, 7)]
    assert len(largest_weights(model, 2)) == 2 * 7 * 2  # 7 decoder matrices per layer, 2 layers


def test_find_by_magnitude_percentage_and_absolute_on_conv1d():
    model = tiny_model("gpt2", num_layers=2)
    stored = model.transformer.h[1].mlp.c_proj.weight  # [in=128, out=64]
    with torch.no_grad():
        stored[100, 7] = 9.0  # [out 7, in 100]
    found = find_by_magnitude(model, 5.0, criterion="absolute")
    assert found == [("transformer.h.1.mlp.c_proj", 7, 100, 9.0)]
    top = find_by_magnitude(model, 100 / (64 * 128), layers=[1])  # top 1 weight of the matrix
    assert top == [("transformer.h.1.mlp.c_proj", 7, 100, 9.0)]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"threshold": -1.0}, "positive"),
        ({"threshold": 1.0, "criterion": "sometimes"}, "criterion"),
        ({"threshold": 1.0, "weight_type": "nonsense"}, "weight_type"),
        ({"threshold": 200.0}, "at most 100"),
    ],
)
def test_find_by_magnitude_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        find_by_magnitude(tiny_model("llama", num_layers=1), **kwargs)


def test_top_magnitudes_equals_a_full_sort_with_exclusions():
    from sw_hooks.analysis.magnitude import top_magnitudes

    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(40, 30, generator=generator)
    weight[7, :] = 5.0 + torch.arange(30) / 100  # one row holding many of the largest
    excluded = [(7, 29), (7, 28)]
    masked = weight.abs().clone()
    for row, col in excluded:
        masked[row, col] = -1
    reference = masked.flatten().topk(12).indices
    expected = [(int(i) // 30, int(i) % 30) for i in reference]
    assert top_magnitudes(weight, 12, excluded) == expected
