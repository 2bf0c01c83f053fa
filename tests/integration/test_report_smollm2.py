"""The report on the real SmolLM2-135M (loaded once per session), kept small."""

import pytest
import torch

from sw_hooks import calibration_text, tokenize
from sw_hooks.analysis.report import collect_report
from sw_hooks.analysis.report_data import ReportOptions
from sw_hooks.outputs import plots
from sw_hooks.outputs.report import write_report

pytestmark = pytest.mark.slow

SUPER = ("model.layers.11.mlp.down_proj", 507, 1229)


def test_report_shows_the_known_super_weight(smollm2, tmp_path) -> None:
    model, tokenizer = smollm2
    ids = tokenize(tokenizer, calibration_text(), max_tokens=192)
    # no quantization sweep: each quantized run costs more than the rest of the report
    options = ReportOptions(prompt_tokens=64, quantization=())
    data = collect_report(model, tokenizer, ids, options=options)
    verified = [w for w in data.detection["candidates"] if w["verdict"] == "super"]
    assert [(w["module"], w["row"], w["col"]) for w in verified] == [SUPER]
    figure = plots.activation_spikes(data.layer_peaks, data.detection)
    marked = {(m.panel, m.layer, m.channel) for m in plots.marks(figure) if m.label == "super"}
    assert marked == {("input", 11, 1229), ("output", 11, 507)}
    pruned = data.impact[1]
    assert pruned["condition"] == "super weights pruned" and pruned["ratio"] > 2.0
    trace = data.traces[0]
    # zeroing the weight shrinks the super activation where it is written (measured: ~4x)
    assert trace["original"]["magnitudes"][11] > 2 * trace["ablated"]["magnitudes"][11]
    write_report(data, tmp_path)
    for name in ("spikes", "residual", "weights", "impact"):
        assert (tmp_path / f"{name}.png").stat().st_size > 5_000
    assert not (tmp_path / "quantization.png").exists()
    assert torch.equal(
        model.model.layers[11].mlp.down_proj.weight[507, 1229], torch.tensor(verified[0]["value"])
    )
