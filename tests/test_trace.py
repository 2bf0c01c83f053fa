"""The residual-stream trace, the weight window and the layer peaks, on planted models."""

from __future__ import annotations

import pytest
import torch

from sw_hooks.analysis.trace import (
    ResidualTrace,
    WeightPatch,
    decoder_layers,
    layer_peaks,
    residual_trace,
    super_activation_trace,
    weight_patch,
)
from sw_hooks.core.record import record
from sw_hooks.core.results import SuperWeight
from sw_hooks.testing import plant_super_weight, tiny_model

SUPER = SuperWeight("model.layers.1.mlp.down_proj", 1, 5, 17, 8.0, token_position=0)


def test_trace_matches_the_hidden_states(planted) -> None:
    ids = planted.prompt()
    trace = residual_trace(planted.model, ids, channel=5, token=0)
    with torch.no_grad():
        hidden = planted.model(ids, output_hidden_states=True).hidden_states
    # hidden_states[i + 1] is the output of layer i; the last one is after the final norm
    expected = [float(h[0, 0, 5].abs()) for h in hidden[1:-1]]
    assert trace.layers == (0, 1, 2, 3)
    assert list(trace.magnitudes[:-1]) == pytest.approx(expected, rel=1e-5)


def test_super_activation_appears_at_its_layer_and_vanishes_when_ablated(planted) -> None:
    original, ablated = super_activation_trace(planted.model, planted.prompt(), SUPER)
    assert original.magnitudes[1] > 100 * original.magnitudes[0]  # written by layer 1
    assert min(original.magnitudes[1:]) > 100 * max(ablated.magnitudes[1:])  # and carried on
    assert ablated.magnitudes[0] == original.magnitudes[0]  # layer 0 is upstream of the weight
    weight = planted.model.model.layers[1].mlp.down_proj.weight
    assert weight[5, 17].item() == 8.0  # restored after the ablated run


@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_decoder_layers_on_other_layouts(arch: str) -> None:
    model = tiny_model(arch, num_layers=3)
    assert sorted(decoder_layers(model)) == [0, 1, 2]
    planted = plant_super_weight(model, 1, 5, 17, trigger_token=1, target_token=2)
    trace = residual_trace(planted.model, planted.prompt(), channel=5, token=0)
    assert trace.magnitudes[1] > 10 * trace.magnitudes[0]


def test_trace_rejects_positions_outside_the_input(planted) -> None:
    with pytest.raises(ValueError, match="token 99"):
        residual_trace(planted.model, planted.prompt(), channel=5, token=99)
    with pytest.raises(ValueError, match="channel 640"):
        residual_trace(planted.model, planted.prompt(), channel=640, token=0)


def test_weight_patch_is_the_window_and_clamps_at_edges(planted) -> None:
    weight = planted.model.model.layers[1].mlp.down_proj.weight
    patch = weight_patch(planted.model, SUPER, radius=3)
    assert (patch.first_row, patch.first_col) == (2, 14)
    assert torch.tensor(patch.values).equal(weight[2:9, 14:21].detach())
    assert patch.centre == 8.0
    corner = weight_patch(planted.model, SuperWeight(SUPER.module, 1, 0, 0, 0.0), radius=3)
    assert (corner.first_row, corner.first_col, len(corner.values)) == (0, 0, 4)
    assert WeightPatch.from_dict(patch.to_dict()) == patch
    with pytest.raises(ValueError, match="outside"):
        weight_patch(planted.model, SuperWeight(SUPER.module, 1, 500, 0, 0.0))


def test_layer_peaks_and_json_round_trip(planted) -> None:
    with record(planted.model) as rec, torch.no_grad():
        planted.model(planted.prompt())
    peaks = layer_peaks(rec.stats)
    assert [(p["layer"], p["output_channel"], p["input_channel"]) for p in peaks][1] == (1, 5, 17)
    trace = residual_trace(planted.model, planted.prompt(), channel=5, token=0)
    assert ResidualTrace.from_dict(trace.to_dict()) == trace
    with pytest.raises(ValueError, match="needs"):
        ResidualTrace.from_dict({"channel": 1})
