import pytest
import torch

from sw_hooks.analysis.detect import (
    DetectionOptions,
    detect,
    run_detection,
    spike_candidates,
    spiking_layers,
)
from sw_hooks.core.record import record
from sw_hooks.testing import ARCHITECTURES, plant_super_weight, tiny_model


def _planted(arch: str, num_layers: int = 4):
    planted = plant_super_weight(
        tiny_model(arch, num_layers=num_layers), 1, 5, 17, trigger_token=1, target_token=2
    )
    return plant_super_weight(planted, num_layers - 1, 9, 33, trigger_token=3)  # decoy


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_finds_exactly_the_planted_weight_and_rejects_the_late_decoy(arch):
    planted = _planted(arch)
    result = run_detection(planted.model, planted.prompt(), calibration=planted.calibration_ids())
    found = {(w.layer, w.row, w.col): w for w in result.candidates}
    assert set(found) == {(1, 5, 17), (3, 9, 33)}
    assert found[(1, 5, 17)].verdict == "super" and found[(1, 5, 17)].impact >= 2.0
    assert found[(3, 9, 33)].verdict == "candidate" and found[(3, 9, 33)].impact < 1.5
    assert [(w.layer, w.row, w.col) for w in result.verified] == [(1, 5, 17)]
    sw = found[(1, 5, 17)]
    assert sw.value == pytest.approx(8.0)
    assert sw.token_position == planted.prompt()[0].tolist().index(1)
    assert sw.output_activation == pytest.approx(8.0 * sw.input_activation, rel=1e-3)
    assert result.joint_ablation_ratio >= 2.0


def test_several_super_weights_in_one_row():
    planted = plant_super_weight(
        tiny_model("llama", num_layers=6), 1, 5, 17, trigger_token=1, target_token=2
    )
    planted = plant_super_weight(planted, 1, 5, 40, trigger_token=4, target_token=2, trigger_dim=58)
    planted = plant_super_weight(
        planted, 2, 11, 70, trigger_token=5, target_token=7, trigger_dim=57
    )
    found = detect(planted.model, planted.prompt(), calibration=planted.calibration_ids(384))
    assert [(w.layer, w.row, w.col, w.verdict) for w in found] == [
        (1, 5, 17, "super"),
        (1, 5, 40, "super"),
        (2, 11, 70, "super"),
    ]


def test_model_is_unchanged_by_detection(planted):
    before = {k: v.clone() for k, v in planted.model.state_dict().items()}
    detect(planted.model, planted.prompt(), calibration=planted.calibration_ids())
    after = planted.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_no_verify_leaves_impact_unmeasured(planted):
    found = detect(planted.model, planted.prompt(), verify_impact=False)
    assert [(w.layer, w.row, w.col, w.impact, w.verdict) for w in found] == [
        (1, 5, 17, None, "candidate"),
        (3, 9, 33, None, "candidate"),
    ]


def test_spike_factor_is_relative_to_the_layer_population(planted):
    with record(planted.model) as rec, torch.no_grad():
        planted.model(planted.prompt())
    names = list(rec.stats)
    assert spiking_layers(rec.stats, 8.0) == [names[1], names[3]]
    assert spiking_layers(rec.stats, 1e9) == []
    assert spike_candidates(planted.model, rec.stats, spike_factor=1e9) == []


def test_quiet_model_has_no_candidates():
    model = tiny_model("llama")
    assert detect(model, torch.randint(16, 256, (1, 32))) == []


@pytest.mark.parametrize(
    "bad",
    [
        {"spike_factor": 0.5},
        {"min_impact": float("nan")},
        {"channel_ratio": 0.0},
        {"min_contribution": 2.0},
        {"max_passes": 0},
        {"window": -1},
    ],
)
def test_bad_options_are_named(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        DetectionOptions(**bad)
