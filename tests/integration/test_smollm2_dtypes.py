"""SmolLM2-135M in float32 and bfloat16: what ``auto`` loads, and the same verdicts either way.

The bfloat16 run is ``sw-hooks detect --dtype bfloat16`` as a user runs it (a subprocess);
the float32 run is the same detection on the session's model, on the same tokens. Impacts may
differ by rounding: ``benchmarks/bench_dtype.py`` measured at most 2.6% (the super weight's
x5.21 in float32, x5.08 in bfloat16); the tolerance is 5%.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sw_hooks import calibration_text, tokenize
from sw_hooks.analysis.detect import run_detection
from sw_hooks.cli._common import PROMPT_TOKENS

pytestmark = pytest.mark.slow

SUPER = ("model.layers.11.mlp.down_proj", 507, 1229)
TOKENS = 1024
IMPACT_TOLERANCE = 0.05


def test_the_gguf_model_loads_as_float32_by_default(smollm2):
    """Q4_1 blocks dequantize exactly in float32, not in bf16: ``auto`` is float32 here."""
    model, _ = smollm2
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def _cli_detect_bf16(out: Path) -> dict:
    command = [
        str(Path(sys.executable).parent / "sw-hooks"), "detect", "--dtype", "bfloat16",
        "--device", "auto", "--max-tokens", str(TOKENS), "--json", str(out),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "bfloat16 on cpu" in done.stderr  # what was loaded, and where (auto: the CPU here)
    return json.loads(out.read_text())


def test_verdicts_agree_in_float32_and_bfloat16(smollm2, tmp_path):
    model, tokenizer = smollm2
    calibration = tokenize(tokenizer, calibration_text(), max_tokens=TOKENS)
    full = run_detection(model, calibration[:, :PROMPT_TOKENS], calibration=calibration)
    half = _cli_detect_bf16(tmp_path / "bf16.json")["candidates"]
    assert [(w["module"], w["row"], w["col"]) for w in half] == [
        w.coordinate for w in full.candidates
    ]
    assert [w["verdict"] for w in half] == [w.verdict for w in full.candidates]
    assert [w.coordinate for w in full.verified] == [SUPER]
    for ours, theirs in zip(full.candidates, half, strict=True):
        assert theirs["impact"] == pytest.approx(ours.impact, rel=IMPACT_TOLERANCE)
