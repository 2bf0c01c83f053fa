"""The real model: SmolLM2-135M-Instruct, loaded once per session."""

import json

import pytest
import torch

from sw_hooks import calibration_text, record, tokenize
from sw_hooks.analysis.detect import run_detection
from sw_hooks.cli import main

pytestmark = pytest.mark.slow

SUPER = ("model.layers.11.mlp.down_proj", 507, 1229)


def test_recorder_sees_the_super_activation(smollm2):
    model, tokenizer = smollm2
    ids = tokenize(tokenizer, calibration_text(), max_tokens=64)
    with record(model) as rec, torch.no_grad():
        model(ids)
    assert len(rec.stats) == 30
    stats = rec.stats[SUPER[0]]
    assert stats.input.top()[0] == SUPER[2]
    assert stats.output.top()[0] == SUPER[1]
    others = [s.output.abs_max.max() for name, s in rec.stats.items() if name != SUPER[0]]
    assert stats.output.top()[1] > 1.5 * float(max(others))  # the largest spike of all 30 layers


def test_detection_verdicts_come_from_measured_impact(smollm2):
    model, tokenizer = smollm2
    calibration = tokenize(tokenizer, calibration_text(), max_tokens=256)
    before = model.model.layers[11].mlp.down_proj.weight.clone()
    result = run_detection(model, calibration[:, :64], calibration=calibration)
    by_coordinate = {w.coordinate: w for w in result.candidates}
    assert SUPER in by_coordinate
    sw = by_coordinate[SUPER]
    assert sw.verdict == "super" and sw.impact >= 2.0 and sw.token_position == 0
    for w in result.candidates:
        assert (w.verdict == "super") == (w.impact >= 2.0)
    late = [w for w in result.candidates if w.layer is not None and w.layer >= 27]
    assert late and all(w.verdict == "candidate" for w in late)  # large late spikes, harmless
    assert result.joint_ablation_ratio >= sw.impact * 0.9
    assert torch.equal(model.model.layers[11].mlp.down_proj.weight, before)


def test_cli_detect_writes_json(smollm2, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr("sw_hooks.models.load_model", lambda *a, **k: smollm2)
    out = tmp_path / "result.json"
    code = main(["detect", "--max-tokens", "192", "--json", str(out), "--quiet"])
    assert code == 0
    data = json.loads(out.read_text())
    assert data["schema_version"] == 3 and data["baseline_perplexity"] > 1
    supers = [w for w in data["candidates"] if w["verdict"] == "super"]
    assert [(w["layer"], w["row"], w["col"]) for w in supers] == [(11, 507, 1229)]
    printed = capsys.readouterr().out
    assert "[507, 1229]" in printed and "super" in printed
