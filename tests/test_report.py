"""The report on a tiny planted model: through the API and through ``sw-hooks report``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sw_hooks.analysis.report import collect_report
from sw_hooks.analysis.report_data import ReportData, ReportOptions
from sw_hooks.cli import main
from sw_hooks.outputs.report import write_report
from sw_hooks.quant.config import QuantConfig, quant_grid
from sw_hooks.testing import planted_llama

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLANTED = ("model.layers.1.mlp.down_proj", 5, 17)
OPTIONS = ReportOptions(
    prompt_tokens=8, quantization=quant_grid([4], [64, 1024], ["zscore:6"]), radius=4
)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[ReportData, Path, list[str]]:
    torch.manual_seed(0)
    planted = planted_llama()
    lines: list[str] = []
    data = collect_report(
        planted.model, None, planted.calibration_ids(128), options=OPTIONS, progress=lines.append
    )
    out = tmp_path_factory.mktemp("report")
    write_report(data, out)
    return data, out, lines


def test_report_finds_and_shows_the_planted_weight(report) -> None:
    data, out, _ = report
    verified = [w for w in data.detection["candidates"] if w["verdict"] == "super"]
    assert [(w["module"], w["row"], w["col"]) for w in verified] == [PLANTED]
    assert data.traces[0]["original"]["channel"] == 5
    assert data.patches[0]["row"] == 5 and data.patches[0]["col"] == 17
    assert data.impact[1]["condition"] == "super weights pruned"
    assert data.impact[1]["ratio"] > 2.0
    assert {(r["block_size"], r["holdout"]) for r in data.quantization["runs"]} == {
        (64, False),
        (64, True),
        (1024, False),
        (1024, True),
    }


def test_report_files_are_written_and_json_holds_every_number(report) -> None:
    data, out, _ = report
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["impact.png", "quantization.png", "residual.png", "spikes.png", "weights.png"]
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == PNG_MAGIC and 5_000 < png.stat().st_size < 300_000
    markdown = (out / "report.md").read_text()
    for name in pngs:
        assert f"]({name})" in markdown
    assert f"{data.impact[1]['perplexity']:.2f}" in markdown  # the table shows the JSON's number
    saved = json.loads((out / "report.json").read_text())
    assert ReportData.from_dict(saved).impact == data.impact
    assert [c["block_size"] for c in saved["options"]["quantization"]] == [64, 1024]


def test_report_shows_progress_per_stage(report) -> None:
    _, _, lines = report
    for stage in ("detection", "residual-stream traces", "impact (Table 1)", "quantization sweep"):
        assert f"{stage} ..." in lines
        assert any(line.startswith(f"{stage}: done in") for line in lines)


def test_report_json_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="schema_version"):
        ReportData.from_dict({"model": "x"})
    with pytest.raises(ValueError, match="lacks"):
        ReportData.from_dict({"schema_version": 1, "model": "x"})
    with pytest.raises(ValueError, match="at least one"):
        ReportOptions(quantization=quant_grid([], [64]))


class CharTokenizer:
    """One token per character (code point mod 256): enough for the CLI on a tiny model."""

    bos_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) % 256 for c in text]}


def test_cli_report_writes_the_report(tmp_path, monkeypatch, capsys) -> None:
    planted = planted_llama()
    monkeypatch.setattr(
        "sw_hooks.models.load_model", lambda *a, **k: (planted.model, CharTokenizer())
    )
    text = tmp_path / "text.txt"
    # chr(1) is the planted trigger, chr(2) its target; the rest is filler
    text.write_text("".join(f"\x01\x02{chr(40 + i % 60)}{chr(100 + i % 90)}" for i in range(40)))
    out = tmp_path / "out"
    argv = ["report", "--text", str(text), "--out", str(out), "--max-tokens", "96"]
    assert main([*argv, "--block-size", "64", "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(out / "report.md")
    data = json.loads((out / "report.json").read_text())
    assert data["tokens"] == 96
    verified = [w for w in data["detection"]["candidates"] if w["verdict"] == "super"]
    assert [(w["module"], w["row"], w["col"]) for w in verified] == [PLANTED]
    assert (out / "spikes.png").read_bytes()[:8] == PNG_MAGIC


def test_cli_report_bad_input_exits_2(tmp_path, capsys) -> None:
    assert main(["report", "--out", str(tmp_path), "--bits", "9", "--quiet"]) == 2
    assert "bits must be an integer from 2 to 8" in capsys.readouterr().err
    afile = tmp_path / "file"
    afile.write_text("x")
    assert main(["report", "--out", str(afile), "--quiet"]) == 2
    assert "is not a folder" in capsys.readouterr().err
    missing = tmp_path / "missing.csv"
    assert main(["report", "--out", str(tmp_path), "--history", str(missing), "--quiet"]) == 2
    assert "no such metrics file" in capsys.readouterr().err


def test_holdout_sweep_keeps_held_weights_exact_and_restores_the_model() -> None:
    from sw_hooks.quant.sweep import holdout_sweep

    planted = planted_llama()
    weight = planted.model.model.layers[1].mlp.down_proj.weight
    before = {k: v.clone() for k, v in planted.model.state_dict().items()}
    seen: list[float] = []
    runs = holdout_sweep(
        planted.model,
        [QuantConfig(3, 64, clip="zscore:1")],
        [PLANTED],
        lambda: seen.append(weight[5, 17].item()) or 1.0,
    )
    held_and_clip = [(r.super_weights_held_out, str(r.config.clip)) for r in runs]
    assert held_and_clip == [(False, "zscore:1"), (True, "zscore:1")]
    assert seen[0] != 8.0 and seen[1] == 8.0  # clipped without holdout, exact with it
    assert all(torch.equal(v, planted.model.state_dict()[k]) for k, v in before.items())


def test_report_reuses_detections_peaks_and_runs_no_extra_forward() -> None:
    """The spikes figure's peaks come from detection's first pass, not a second recording."""
    from sw_hooks.analysis.detect import run_detection
    from sw_hooks.analysis.trace import layer_peaks
    from sw_hooks.core.record import record

    planted = planted_llama()
    ids = planted.calibration_ids(64)
    prompt = ids[:, :8]
    forwards: list[str] = []
    handle = planted.model.register_forward_pre_hook(lambda *_: forwards.append("forward"))
    try:
        alone = run_detection(planted.model, prompt, calibration=ids)
        detection_forwards = len(forwards)
        forwards.clear()
        options = ReportOptions(prompt_tokens=8, quantization=())
        data = collect_report(planted.model, None, ids, options=options, progress=forwards.append)
    finally:
        handle.remove()
    detection_end = forwards.index(next(f for f in forwards if f.startswith("detection: done")))
    next_stage = forwards.index("residual-stream traces ...")
    assert forwards[detection_end + 1 : next_stage] == []  # nothing ran between the stages
    assert forwards[:detection_end].count("forward") == detection_forwards
    with record(planted.model) as rec, torch.no_grad():
        planted.model(prompt)
    assert data.layer_peaks == layer_peaks(rec.stats)
    assert [peak.to_dict() for peak in alone.layer_peaks] == layer_peaks(rec.stats)
    assert data.result.layer_peaks == alone.layer_peaks
    assert (alone.layer_peaks[1].output_channel, alone.layer_peaks[1].input_channel) == (5, 17)


def test_report_json_keeps_the_peaks_once_and_reads_version_1(report) -> None:
    data, out, _ = report
    saved = json.loads((out / "report.json").read_text())
    assert "layer_peaks" not in saved and saved["detection"]["layer_peaks"] == data.layer_peaks
    assert saved["detection"]["layer_peaks"][1]["output_channel"] == 5
    old_detection = {k: v for k, v in saved["detection"].items() if k != "layer_peaks"}
    version_1 = {
        **saved,
        "schema_version": 1,
        "detection": old_detection,
        "layer_peaks": data.layer_peaks,
    }
    assert ReportData.from_dict(version_1).layer_peaks == data.layer_peaks
    without_peaks = {k: v for k, v in version_1.items() if k != "layer_peaks"}
    with pytest.raises(ValueError, match="lacks"):
        ReportData.from_dict(without_peaks)


def test_report_html_is_one_file_with_the_figures_inside(report) -> None:
    import base64
    import re

    _, out, _ = report
    page = (out / "report.html").read_text()
    for png in sorted(out.glob("*.png")):
        encoded = base64.b64encode(png.read_bytes()).decode()
        assert f'src="data:image/png;base64,{encoded}"' in page, png.name
    sources = re.findall(r'\b(?:src|href)\s*=\s*"([^"]*)"', page)
    assert len(sources) == 5 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "http" not in page and "<link" not in page and "<script" not in page
    assert "<h1>Super weights of LlamaForCausalLM</h1>" in page
    assert "<code>model.layers.1.mlp.down_proj</code>" in page


def test_report_html_escapes_every_text(report, tmp_path) -> None:
    from dataclasses import replace

    data, _, _ = report
    write_report(replace(data, model='<script src="x">&'), tmp_path)
    page = (tmp_path / "report.html").read_text()
    assert "<script" not in page
    assert "<title>Super weights of &lt;script src=&quot;x&quot;&gt;&amp;</title>" in page
