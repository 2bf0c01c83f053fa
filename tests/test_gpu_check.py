"""The GPU check script runs end to end on the CPU with a tiny shape."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.slow
def test_gpu_check_runs_small_on_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "gpu_check.json"
    argv = ["--device", "cpu", "--small", "--tokens", "16", "--repeats", "1",
            "--backend", "aot_eager", "--out", str(out)]  # fmt: skip
    figures = module.main(argv)
    assert json.loads(out.read_text()) == figures
    for key in ("eager_overhead_ratio", "compiled_overhead_ratio", "detection_s"):
        assert figures[key] > 0
    assert figures["shape"] == "small" and figures["backend"] == "aot_eager"
