"""Every impact says what it was measured on: the table, the JSON and the report.

A planted Llama (a super weight in layer 1 of 6, decoys in layers 3 and 5) is detected by the
``sw-hooks detect`` command on a text file of 1536 byte tokens: the decoys are screened
after the first window, the super weight is measured on every token.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sw_hooks.analysis.report_data import ReportData
from sw_hooks.core.provenance import token_digest
from sw_hooks.core.results import DetectionResult, load_super_weights
from sw_hooks.outputs.report_sections import Paragraph, report_blocks
from sw_hooks.outputs.tables import Table
from sw_hooks.testing import byte_tokenizer, plant_super_weight, planted_llama, save_checkpoint

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
TOKENS = 1536


def _text(pieces: int = 240) -> str:
    """Byte tokens: trigger '"' and target '#' of the super weight, the decoys' '$' and '&'."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    return "".join(f'"#{letters[i % 26]}${letters[(i * 7) % 26]}&{letters[(i * 3) % 26]}'
                   for i in range(pieces))  # fmt: skip


@pytest.fixture(scope="module")
def detected(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, dict]:
    folder = tmp_path_factory.mktemp("planted")
    planted = plant_super_weight(planted_llama(num_layers=6), 3, 11, 40, trigger_token=5)
    save_checkpoint(planted.model, folder)
    text = folder / "text.txt"
    text.write_text(_text())
    out = folder / "result.json"
    command = [sys.executable, "-m", "sw_hooks.cli", "detect", str(folder), "--text", str(text),
               "--max-tokens", str(TOKENS), "--json", str(out), "--quiet"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=900)
    assert done.returncode == 0, done.stderr
    return text, done.stdout, json.loads(out.read_text())


def test_the_json_says_what_each_impact_was_measured_on(detected):
    text, _, data = detected
    ids = byte_tokenizer()(text.read_text(), add_special_tokens=False)["input_ids"][:TOKENS]
    import torch

    assert data["schema_version"] == 3
    assert data["calibration"] == {
        "name": str(text),
        "digest": token_digest(torch.tensor([ids])),
        "tokens": TOKENS,
        "scored": TOKENS - 1,
        "window": 512,
        "stride": 256,
        "screened_tokens": 511,
        "screened_joint_ratio": pytest.approx(data["calibration"]["screened_joint_ratio"]),
        "loss": "perplexity",
    }
    assert data["calibration"]["screened_joint_ratio"] < 2.0**0.25
    scored = {(w["layer"], w["row"], w["col"]): (w["impact_tokens"], w["screened"], w["verdict"])
              for w in data["candidates"]}  # fmt: skip
    assert scored == {
        (1, 5, 17): (TOKENS - 1, False, "super"),
        (3, 11, 40): (511, True, "candidate"),
        (5, 9, 33): (511, True, "candidate"),
    }


def test_the_table_says_it_too(detected):
    text, printed, data = detected
    digest = data["calibration"]["digest"]
    assert (
        f"impacts measured on: {text} (sha256 {digest}), {TOKENS - 1} tokens scored, "
        "windows of 512, stride 256"
    ) in printed
    rows = {line.split()[2]: line for line in printed.splitlines() if "down_proj" in line}
    assert "1535 " in rows["[5,"] and "super" in rows["[5,"]
    assert " 511*" in rows["[9,"] and " 511*" in rows["[11,"]
    assert "* screened: scored on the first window's 511 tokens only" in printed


def test_the_report_says_it_too(detected):
    text, _, data = detected
    report = ReportData(data["model"], TOKENS, data)
    blocks = report_blocks(report, [])
    said = " ".join(b.text for b in blocks if isinstance(b, Paragraph))
    assert f"Impacts measured on: {text} (sha256 {data['calibration']['digest']})" in said
    assert "* screened: scored on the first window's 511 tokens only" in said
    table = next(b for b in blocks if isinstance(b, Table))
    assert {row[table.header.index("scored")] for row in table.rows} == {"1535", "511*"}


def test_a_version_1_file_is_still_read(detected, tmp_path):
    _, _, data = detected
    old = {k: v for k, v in data.items() if k not in ("calibration", "candidates")}
    old["schema_version"] = 1
    old["super_weights"] = [
        {k: v for k, v in w.items() if k not in ("impact_tokens", "screened")}
        for w in data["candidates"]
    ]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    result = DetectionResult.load(path)
    assert result.calibration is None and len(result.verified) == 1
    assert all(w.impact_tokens is None for w in result.candidates)
    assert len(load_super_weights(path, candidates=True)) == 3
    assert DetectionResult.from_dict(data).calibration.digest == data["calibration"]["digest"]


def test_block_by_block_detection_says_the_same(detected, tmp_path):
    text, _, data = detected
    out = tmp_path / "streamed.json"
    command = [sys.executable, "-m", "sw_hooks.cli", "detect", str(text.parent), "--stream",
               "--text", str(text), "--max-tokens", str(TOKENS), "--json", str(out), "--quiet"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=900)
    assert done.returncode == 0, done.stderr
    streamed = json.loads(out.read_text())
    calibration = dict(streamed["calibration"])
    ratio = calibration.pop("screened_joint_ratio")
    assert ratio == pytest.approx(data["calibration"]["screened_joint_ratio"], rel=1e-5)
    assert calibration == {
        k: v for k, v in data["calibration"].items() if k != "screened_joint_ratio"
    }
    assert [(w["impact_tokens"], w["screened"]) for w in streamed["candidates"]] == [
        (w["impact_tokens"], w["screened"]) for w in data["candidates"]
    ]
    assert f"impacts measured on: {text}" in done.stdout
