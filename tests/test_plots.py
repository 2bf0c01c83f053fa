"""Figures from real results of a tiny planted model: valid PNGs that mark the planted weight.

The planted model has a causal super weight at layers[1] [5, 17] and a harmless decoy at
layers[3] [9, 33]. Each figure is checked through the data it marked (``plots.marks``),
never through pixels, and written as a PNG whose header and size are checked.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch

from sw_hooks.analysis.detect import run_detection
from sw_hooks.analysis.impact import perplexity, table1
from sw_hooks.analysis.trace import layer_peaks, super_activation_trace, weight_patch
from sw_hooks.core.record import record
from sw_hooks.core.results import DetectionResult
from sw_hooks.outputs import plots
from sw_hooks.quant.config import QuantConfig
from sw_hooks.quant.sweep import holdout_sweep
from sw_hooks.testing import PlantedModel, planted_llama

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LAYER, ROW, COL = 1, 5, 17


@pytest.fixture(scope="module")
def planted_result() -> tuple[PlantedModel, DetectionResult]:
    torch.manual_seed(0)
    planted = planted_llama()
    result = run_detection(planted.model, planted.prompt(), calibration=planted.calibration_ids())
    return planted, result


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def saved(figure, tmp_path: Path, name: str) -> tuple[int, int]:
    path = plots.save_figure(figure, tmp_path / name)
    width, height = png_size(path)
    assert 300 <= width <= 2000 and 200 <= height <= 1000  # ~100 dpi, a few inches
    assert 5_000 < path.stat().st_size < 300_000
    return width, height


def test_activation_spikes_marks_the_planted_layer_and_channels(planted_result, tmp_path) -> None:
    planted, result = planted_result
    with record(planted.model) as rec, torch.no_grad():
        planted.model(planted.prompt())
    figure = plots.activation_spikes(layer_peaks(rec.stats), result.to_dict())  # JSON in
    supers = [m for m in plots.marks(figure) if m.label == "super"]
    assert {(m.panel, m.layer, m.channel) for m in supers} == {
        ("input", LAYER, COL),
        ("output", LAYER, ROW),
    }
    decoys = [(m.panel, m.layer, m.channel) for m in plots.marks(figure) if m.label == "candidate"]
    assert decoys == [("input", 3, 33), ("output", 3, 9)]
    # the mark sits on the plotted spike: the layer's max, at the marked channel
    peaks = {row["layer"]: row for row in layer_peaks(rec.stats)}
    output_mark = next(m for m in supers if m.panel == "output")
    assert output_mark.y == peaks[LAYER]["output_max"]
    assert peaks[LAYER]["output_channel"] == ROW and peaks[LAYER]["input_channel"] == COL
    assert output_mark.y > 100 * peaks[0]["output_max"]
    saved(figure, tmp_path, "spikes.png")


def test_activation_spikes_takes_recorder_stats_too(planted_result) -> None:
    planted, result = planted_result
    with record(planted.model) as rec, torch.no_grad():
        planted.model(planted.prompt())
    figure = plots.activation_spikes(rec.stats, result)
    assert [m.channel for m in plots.marks(figure) if m.label == "super"] == [COL, ROW]


def test_residual_stream_marks_the_writing_layer(planted_result, tmp_path) -> None:
    planted, result = planted_result
    weight = result.verified[0]
    original, ablated = super_activation_trace(planted.model, planted.prompt(), weight)
    figure = plots.residual_stream(original.to_dict(), ablated, weight)
    (mark,) = plots.marks(figure)
    assert (mark.layer, mark.channel) == (LAYER, ROW)
    assert mark.y == original.magnitudes[LAYER]
    saved(figure, tmp_path, "residual.png")


def test_weight_heatmap_marks_the_planted_weight(planted_result, tmp_path) -> None:
    planted, result = planted_result
    patch = weight_patch(planted.model, result.verified[0], radius=6)
    figure = plots.weight_heatmaps([patch.to_dict()])
    (mark,) = plots.marks(figure)
    assert (mark.layer, mark.channel, mark.x, mark.y) == (LAYER, ROW, COL, ROW)
    assert patch.centre == pytest.approx(8.0)
    saved(figure, tmp_path, "weights.png")


def test_impact_bars_mark_the_pruned_condition(planted_result, tmp_path) -> None:
    planted, result = planted_result
    rows = table1(planted.model, planted.calibration_ids(), result.verified, stopwords=[2, 40])
    figure = plots.impact_bars(rows)
    by_panel = {m.panel: m for m in plots.marks(figure)}
    assert by_panel["perplexity"].label == "super weights pruned"
    assert by_panel["perplexity"].y == rows[1].perplexity > 2 * rows[0].perplexity
    assert by_panel["stopwords"].y == rows[1].stopword_mass
    saved(figure, tmp_path, "impact.png")


def test_quantization_sweep_draws_both_holdout_lines(planted_result, tmp_path) -> None:
    planted, result = planted_result
    ids = planted.calibration_ids()
    runs = holdout_sweep(
        planted.model,
        [QuantConfig(3, 64, clip="zscore:3"), QuantConfig(3, 512, clip="zscore:3")],
        result.verified,
        lambda: perplexity(planted.model, ids),
    )
    figure = plots.quantization_sweep(
        {"baseline_perplexity": 72.0, "runs": [r.to_dict() for r in runs]}
    )
    (axes,) = figure.axes
    assert len(axes.lines) == 3  # no holdout, holdout, baseline
    assert sorted(axes.lines[0].get_xdata()) == [64, 512]
    saved(figure, tmp_path, "quantization.png")


def test_figures_take_the_result_objects_themselves(planted_result) -> None:
    planted, result = planted_result
    figure = plots.activation_spikes(result.layer_peaks, result)
    supers = {(m.panel, m.layer, m.channel, m.y) for m in plots.marks(figure) if m.label == "super"}
    peak = result.layer_peaks[LAYER]
    assert supers == {
        ("input", LAYER, COL, peak.input_max),
        ("output", LAYER, ROW, peak.output_max),
    }
    runs = holdout_sweep(
        planted.model, [QuantConfig(3, 64, clip="zscore:3")], result.verified, lambda: 50.0
    )
    (axes,) = plots.quantization_sweep(runs, 40.0).axes
    assert [list(line.get_ydata()) for line in axes.lines] == [[50.0], [50.0], [40.0, 40.0]]


def test_json_rows_are_read_into_result_objects_with_one_clear_error() -> None:
    run = {"bits": 9, "block_size": 64, "clip": "none", "holdout": False, "perplexity": 1.0}
    with pytest.raises(ValueError, match="bits must be an integer from 2 to 8"):
        plots.quantization_sweep([run])
    row = {"condition": "original", "perplexity": 10.0, "stopword_mass": None}
    with pytest.raises(ValueError, match=r"impact rows lack \['kl_divergence', 'ratio'"):
        plots.impact_bars([row])
    with pytest.raises(ValueError, match="layer peak lacks"):
        plots.activation_spikes([{"layer": 0, "input_max": 1.0, "output_max": 1.0}])
    with pytest.raises(ValueError, match="expected a LayerPeak or its JSON object, got int"):
        plots.activation_spikes([3])


def test_monitoring_history_from_a_csv(tmp_path) -> None:
    key = "sw/train/layer_1.row_5.col_17"
    lines = [f"step,train_loss,{key}/activation,{key}/value"]
    lines += [f"{s},{5 - s * 0.1},{4600 - s * 10},{8 - s * 0.01}" for s in range(0, 20, 2)]
    lines += ["19,4.0,,"]  # a row of other metrics: blanks are skipped
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text("\n".join(lines) + "\n")
    figure = plots.monitoring_history(csv_path)
    marks = {m.panel: m for m in plots.marks(figure)}
    assert (marks["activation"].layer, marks["activation"].channel) == (LAYER, ROW)
    assert (marks["value"].x, marks["value"].y) == (18.0, pytest.approx(7.82))
    saved(figure, tmp_path, "history.png")


def test_bad_input_is_one_clear_error() -> None:
    with pytest.raises(ValueError, match="no layer peaks"):
        plots.activation_spikes([])
    with pytest.raises(ValueError, match="lack"):
        plots.impact_bars([{"condition": "original"}])
    with pytest.raises(ValueError, match="schema_version"):
        plots.activation_spikes([{"layer": 0, "input_max": 1, "output_max": 1}], {"x": 1})
    with pytest.raises(ValueError, match="no super-weight values"):
        plots.monitoring_history([{"step": 1, "train_loss": 2.0}])
    with pytest.raises(ValueError, match="no weight patches"):
        plots.weight_heatmaps([])
    with pytest.raises(ValueError, match="one magnitude per layer"):
        plots.residual_stream({"channel": 1, "token": 0, "layers": [0, 1], "magnitudes": [1.0]})


def imported_modules(path: Path, top_level_only: bool) -> set[str]:
    import ast

    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_matplotlib_is_imported_lazily_and_the_core_never_imports_plots() -> None:
    package = Path(plots.__file__).parent.parent
    for outside in ("outputs/plots.py", "outputs/report.py", "cli/report.py", "analysis/trace.py"):
        top = imported_modules(package / outside, top_level_only=True)
        assert not any(name.startswith("matplotlib") for name in top), outside
    for core in package.rglob("*.py"):
        if core.parent.name in ("outputs", "cli"):
            continue
        used = imported_modules(core, top_level_only=False)
        assert not used & {"sw_hooks.outputs.plots", "sw_hooks.outputs.report"}, core.name
