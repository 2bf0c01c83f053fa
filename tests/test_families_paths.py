"""The paths after detection on every model family: masks, the monitor and the report.

Each model has a spike pair planted in layer 1 (on every token, so the weight matters to the
output) and decoys beside it; everything here asserts on those planted coordinates.
"""

import warnings
from dataclasses import replace

import pytest
import torch

from sw_hooks.analysis.detect import spike_candidates
from sw_hooks.analysis.losses import EmbeddingCosine
from sw_hooks.analysis.report import collect_report
from sw_hooks.analysis.report_data import ReportOptions
from sw_hooks.core.locate import find_down_projections, layer_index
from sw_hooks.core.masks import ablate, preserve, restore_activation, scale
from sw_hooks.core.record import record
from sw_hooks.core.results import SuperWeight
from sw_hooks.outputs.report import markdown, write_report
from sw_hooks.testing import (
    FAMILIES,
    HandWritten,
    family_input,
    plant_decoy,
    plant_spike_pair,
    tiny_family,
)
from sw_hooks.training.events import weight_tag
from sw_hooks.training.session import watch

PLANTED_ROW, PLANTED_COL, DECOY_ROW, DECOY_COL = 5, 17, 9, 33


def _planted_model(family: str) -> tuple[torch.nn.Module, SuperWeight, list[SuperWeight]]:
    """A three-layer model with a spike pair in layer 1 and decoys in layers 1 and 0."""
    model = tiny_family(family, num_layers=3)
    extra = {"example_input": family_input(model)} if isinstance(model, HandWritten) else {}
    names = list(find_down_projections(model, **extra))
    layer_1, layer_0 = (
        next(n for n in names if layer_index(n) == i and not n.startswith("decoder"))
        for i in (1, 0)
    )
    planted = plant_spike_pair(model, layer_1, PLANTED_ROW, PLANTED_COL, on_every_token=True)
    plant_decoy(model, layer_1, DECOY_ROW, DECOY_COL)
    plant_decoy(model, layer_0, DECOY_ROW, DECOY_COL)
    decoys = [SuperWeight(m, layer_index(m), DECOY_ROW, DECOY_COL, 8.0) for m in (layer_1, layer_0)]
    return model, SuperWeight(planted.module, 1, PLANTED_ROW, PLANTED_COL, 8.0), decoys


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _changed(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> dict[str, list]:
    """``{parameter: [(row, col), ...]}`` of every element that differs from ``before``."""
    changed = {}
    for name, p in model.named_parameters():
        where = (p.detach() != before[name]).nonzero().tolist()
        if where:
            changed[name] = [tuple(x) for x in where]
    return changed


def _element(model: torch.nn.Module, weight: SuperWeight) -> float:
    return float(model.get_submodule(weight.module).weight.detach()[weight.row, weight.col])


def _weight_keys(weights: list[SuperWeight]) -> dict[str, list]:
    # torch.nn.Linear stores [out, in], as the coordinates are written.
    keys: dict[str, list] = {}
    for w in weights:
        keys.setdefault(f"{w.module}.weight", []).append((w.row, w.col))
    return {k: sorted(v) for k, v in keys.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_masks_change_exactly_the_listed_weights_and_restore_every_bit(family):
    model, planted, decoys = _planted_model(family)
    weights = [planted, decoys[0]]
    before = _snapshot(model)
    with ablate(model, weights):
        assert _changed(model, before) == _weight_keys(weights)
        assert [_element(model, w) for w in weights] == [0.0, 0.0]
    assert _changed(model, before) == {}
    with scale(model, weights, 0.25):
        assert _changed(model, before) == _weight_keys(weights)
        assert [_element(model, w) for w in weights] == [2.0, 2.0]
    assert _changed(model, before) == {}
    with preserve(model, weights), torch.no_grad():
        assert _changed(model, before) == {}
        for w in weights:  # edits the mask undoes on exit
            model.get_submodule(w.module).weight[w.row, w.col] = 123.0
        assert _changed(model, before) == _weight_keys(weights)
    assert _changed(model, before) == {}


def _down_projection_output(model: torch.nn.Module, module: str) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    handle = model.get_submodule(module).register_forward_hook(
        lambda m, args, out: seen.append(out.detach().clone())
    )
    try:
        with torch.no_grad():
            model(**family_input(model))
    finally:
        handle.remove()
    return seen[0]


def _hidden_output(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        output = model(**family_input(model))
    return output if isinstance(output, torch.Tensor) else output[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_restore_activation_puts_the_super_activation_back_at_its_token(family):
    """It works on every family (none raises): each down-projection returns its tokens on
    the second-to-last axis, so the activation goes back at its token."""
    model, planted, _ = _planted_model(family)
    with record(model) as recorder, torch.no_grad():
        baseline = _hidden_output(model)
    (found,) = spike_candidates(model, recorder.stats)
    assert (found.module, found.row, found.col) == (planted.module, PLANTED_ROW, PLANTED_COL)
    original = _down_projection_output(model, planted.module)[0, :, PLANTED_ROW]
    with ablate(model, [found]), restore_activation(model, [found]):
        restored = _down_projection_output(model, planted.module)[0, :, PLANTED_ROW]
    assert float(restored[found.token_position]) == found.output_activation
    assert found.output_activation == pytest.approx(float(original[found.token_position]))
    # The activation on every token written back: the ablated model gives the same output.
    every_token = [
        replace(found, token_position=t, output_activation=float(a)) for t, a in enumerate(original)
    ]
    with ablate(model, [found]):
        ablated = _hidden_output(model)
        with restore_activation(model, every_token):
            written_back = _hidden_output(model)
    assert (ablated - baseline).abs().max() > 1.0
    torch.testing.assert_close(written_back, baseline, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_watch_finds_the_planted_weight_then_sees_it_collapse_when_ablated(family):
    model, planted, _ = _planted_model(family)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "skipping the experts", UserWarning)
        with watch(model) as first, torch.no_grad():
            model(**family_input(model))
        with ablate(model, [planted]), watch(model, first.tracker, step=1) as second:
            with torch.no_grad():
                model(**family_input(model))
    coordinate = (planted.module, PLANTED_ROW, PLANTED_COL)
    assert [(e.kind, e.module, e.row, e.col) for e in first.events] == [("found", *coordinate)]
    tag = weight_tag(*coordinate)
    assert tag == f"layer_1.row_{PLANTED_ROW}.col_{PLANTED_COL}"
    assert first.values[f"sw/watch/{tag}/value"] == 8.0
    assert first.values[f"sw/watch/{tag}/activation"] == first.events[0].activation
    assert first.values[f"sw/event/found/{tag}"] == 1.0
    assert [(e.kind, e.module, e.row, e.col) for e in second.events] == [
        ("collapsed", *coordinate),
        ("drifted", *coordinate),  # the value went from 8 to 0 as well
    ]
    assert second.values[f"sw/watch/{tag}/value"] == 0.0


def _report_options() -> ReportOptions:
    return ReportOptions(radius=2)


def _loss_fn(model: torch.nn.Module) -> dict:
    # A module without a Hugging Face config names its loss itself.
    return {"loss_fn": EmbeddingCosine()} if isinstance(model, HandWritten) else {}


LEFT_OUT = (
    "Table 1 and the quantization sweep are left out: they measure perplexity and "
    "next-token probabilities, which only a causal LM has."
)


@pytest.mark.parametrize("family", FAMILIES)
def test_report_on_every_family_lists_the_planted_weight_as_super(family, tmp_path):
    model, planted, _ = _planted_model(family)
    before = _snapshot(model)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "skipping the experts", UserWarning)
        data = collect_report(
            model, None, family_input(model), options=_report_options(), **_loss_fn(model)
        )
    assert _changed(model, before) == {}
    found = [(w.module, w.row, w.col, w.verdict) for w in data.result.candidates]
    assert found == [(planted.module, PLANTED_ROW, PLANTED_COL, "super")]
    assert data.result.options["loss"] == "cosine"
    assert data.impact == [] and data.quantization == {}
    (trace,) = data.traces
    assert trace["original"]["channel"] == PLANTED_ROW
    assert trace["original"]["layers"] == [0, 1, 2]
    # The super activation is written in layer 1 and (nearly) gone with the weight zeroed;
    # post-norm encoders (BERT, RoBERTa) normalise both, so the ratio is below the 8 planted.
    assert trace["original"]["magnitudes"][1] > 5 * trace["ablated"]["magnitudes"][1]
    (patch,) = data.patches
    assert patch["values"][2][2] == 8.0
    path = write_report(data, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "residual.png",
        "spikes.png",
        "weights.png",
    ]
    text = path.read_text()
    assert LEFT_OUT in text
    assert "| impact (cosine) |" in text
    impact = data.result.candidates[0].impact
    assert f"x{impact:.2f}" in text


def test_report_on_a_non_causal_model_refuses_a_candidate_before_detection():
    model, _, _ = _planted_model("bert")
    other = tiny_family("bert", num_layers=3)
    called: list[str] = []
    with pytest.raises(ValueError, match="comparing with a candidate needs a causal LM"):
        collect_report(model, None, family_input(model), candidate=other, progress=called.append)
    assert called == []


def test_causal_report_markdown_keeps_its_impact_header():
    from sw_hooks.analysis.report_data import ReportData
    from sw_hooks.core.results import DetectionResult

    result = DetectionResult(model="m", candidates=(SuperWeight("a.1.b", 1, 5, 17, 8.0),))
    text = markdown(ReportData("m", 8, result.to_dict()), [])
    assert "| impact |" in text
    assert "left out" not in text


def test_cli_report_on_a_saved_encoder(tmp_path):
    """``sw-hooks report`` on a BERT checkpoint: detection by its embeddings, Table 1 left out."""
    import json
    import subprocess
    import sys

    from sw_hooks.testing import save_checkpoint

    model, planted, _ = _planted_model("bert")
    folder = tmp_path / "bert"
    save_checkpoint(model, folder)
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 8)
    out = tmp_path / "report"
    command = [sys.executable, "-m", "sw_hooks.cli", "report", str(folder), "--text", str(text)]
    done = subprocess.run(
        [*command, "--out", str(out), "--quiet"], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads((out / "report.json").read_text())
    found = [
        (w["module"], w["row"], w["col"], w["verdict"]) for w in data["detection"]["candidates"]
    ]
    assert found == [(planted.module, PLANTED_ROW, PLANTED_COL, "super")]
    assert data["detection"]["options"]["loss"] == "cosine"
    assert data["impact"] == [] and data["quantization"] == {}
    assert LEFT_OUT in (out / "report.md").read_text()
    assert {"spikes.png", "residual.png", "weights.png"} <= {p.name for p in out.iterdir()}
