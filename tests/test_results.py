import json

import pytest

from sw_hooks.core.results import (
    DetectionResult,
    LayerPeak,
    SuperWeight,
    load_super_weights,
    save_super_weights,
)

SW = SuperWeight("model.layers.2.mlp.down_proj", 2, 3968, 7003, -1.5, 10.0, -2000.0, 0)


def test_round_trip_json(tmp_path):
    result = DetectionResult("m", (SW.with_impact(3.0, 2.0), SW), 12.5, 40.0, True, 2)
    path = tmp_path / "r.json"
    result.save(path)
    assert DetectionResult.load(path) == result
    assert json.loads(path.read_text())["schema_version"] == 3
    save_super_weights([SW], tmp_path / "w.json")
    assert load_super_weights(tmp_path / "w.json", candidates=True) == [SW]
    assert DetectionResult.load(tmp_path / "w.json").candidates == (SW,)


VERIFIED = SW.with_impact(40.0, 2.0)
REFUTED = SW.with_impact(1.1, 2.0)


def test_one_selection_rule_verified_by_default_candidates_when_asked(tmp_path):
    result = DetectionResult("m", (VERIFIED, REFUTED))
    assert result.select() == (VERIFIED,)
    assert result.select(candidates=True) == (VERIFIED, REFUTED)
    result.save(tmp_path / "r.json")
    assert load_super_weights(tmp_path / "r.json") == [VERIFIED]
    assert load_super_weights(tmp_path / "r.json", candidates=True) == [VERIFIED, REFUTED]


def test_verified_weights_of_an_unverified_result_are_refused_not_guessed(tmp_path):
    unverified = DetectionResult("m", (SW,))  # detect --no-verify: no impact measured
    with pytest.raises(ValueError, match="never verified.*candidates=True.*--candidates"):
        unverified.select()
    assert unverified.select(candidates=True) == (SW,)
    assert DetectionResult("m", ()).select() == ()


def test_super_weights_is_the_deprecated_name_of_candidates():
    result = DetectionResult("m", (VERIFIED, REFUTED))
    with pytest.warns(DeprecationWarning, match="renamed candidates"):
        assert result.super_weights == result.candidates == (VERIFIED, REFUTED)


def test_version_1_files_still_load_and_a_file_without_model_is_read_too(tmp_path):
    # Version 1 named every candidate "super_weights"; save_super_weights wrote no model.
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"schema_version": 1, "super_weights": [VERIFIED.to_dict()]}))
    result = DetectionResult.load(path)
    assert (result.model, result.candidates) == ("", (VERIFIED,))
    assert load_super_weights(path) == [VERIFIED]


def test_verdict_follows_measured_impact():
    assert SW.with_impact(2.0, 2.0).verdict == "super"
    assert SW.with_impact(1.99, 2.0).verdict == "candidate"
    assert SW.with_impact(float("nan"), 2.0).verdict == "candidate"


@pytest.mark.parametrize(
    "bad",
    [
        {"module": "m", "row": -1, "col": 0, "value": 1.0},
        {"module": "m", "row": "1", "col": 0, "value": 1.0},
        {"module": "m", "row": 1, "col": 0},
        {"module": "m", "row": 1, "col": 0, "value": 1.0, "verdict": "maybe"},
        {"module": "m", "row": 1, "col": 0, "value": 1.0, "extra": 1},
        [1, 2],
    ],
)
def test_malformed_super_weight_is_rejected(bad):
    with pytest.raises(ValueError):
        SuperWeight.from_dict(bad)


def test_bad_files(tmp_path):
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_super_weights(tmp_path / "x.json")
    (tmp_path / "y.json").write_text('{"schema_version": 99, "super_weights": []}')
    with pytest.raises(ValueError, match="schema_version"):
        DetectionResult.load(tmp_path / "y.json")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_super_weights(tmp_path / "missing.json")


PEAK = LayerPeak("model.layers.2.mlp.down_proj", 2, 10.0, 7003, 2000.0, 3968)


def test_layer_peaks_round_trip_and_old_files_still_load(tmp_path):
    result = DetectionResult("m", (SW,), passes=1, layer_peaks=(PEAK,))
    path = tmp_path / "r.json"
    result.save(path)
    saved = json.loads(path.read_text())
    assert saved["layer_peaks"] == [
        {
            "module": "model.layers.2.mlp.down_proj",
            "layer": 2,
            "input_max": 10.0,
            "input_channel": 7003,
            "output_max": 2000.0,
            "output_channel": 3968,
        }
    ]
    assert DetectionResult.load(path) == result
    del saved["layer_peaks"]  # a file written before detection kept the peaks
    path.write_text(json.dumps(saved))
    assert DetectionResult.load(path).layer_peaks == ()


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"module": "m", "layer": 0, "input_max": 1.0}, "lacks"),
        ({**PEAK.to_dict(), "input_channel": -1}, "input_channel"),
        ({**PEAK.to_dict(), "output_max": "big"}, "output_max"),
        ([1.0, 2.0], "JSON object"),
    ],
)
def test_malformed_layer_peak_is_rejected(bad, message):
    with pytest.raises(ValueError, match=message):
        LayerPeak.from_dict(bad)
    data = DetectionResult("m", (SW,)).to_dict()
    with pytest.raises(ValueError, match=message):
        DetectionResult.from_dict({**data, "layer_peaks": [bad]})
