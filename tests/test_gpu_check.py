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
    assert {k: figures[k] for k in ("device", "shape", "dtype", "batch", "tokens", "backend")} == {
        "device": "cpu", "shape": "small", "dtype": "bfloat16", "batch": 1, "tokens": 16,
        "backend": "aot_eager",
    }  # fmt: skip
    # each ratio is the quotient of the two times it reports, not a figure made up apart
    for ratio, recorded, plain in (
        ("eager_overhead_ratio", "eager_recorded_s", "eager_s"),
        ("compiled_overhead_ratio", "compiled_recorded_s", "compiled_s"),
    ):
        assert figures[ratio] == figures[recorded] / figures[plain]
    # the timed runs gave the right answers: the planted weight is detected, first and alone,
    # and the compiled model recorded the eager model's maxima (a hook lost under compile
    # gives a difference of 1; bf16 rounding of a reordered reduction stays far below 1e-2)
    assert figures["detected"] == figures["planted"] == [1, 5, 17]
    assert figures["candidates"] == 1
    assert figures["compiled_recorded_max_rel_diff"] < 1e-2
    assert "peak_memory_delta_bytes" not in figures  # measured on CUDA only


@pytest.mark.slow
def test_gpu_check_cli_runs_the_command_with_device_and_dtype(tmp_path, monkeypatch):
    """``--cli``'s runs on the CPU with the tiny planted checkpoint: in memory and streamed,
    the planted weight is verified, and each command carried ``--device`` and ``--dtype``."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    from _gpu_cli import cli_runs

    runs = cli_runs("cpu", small=True, checkpoint=tmp_path / "planted", tokens=64, smollm2=False)
    assert set(runs) == {"planted in memory", "planted --stream"}
    for run in runs.values():
        assert run["returncode"] == 0, run["stderr_tail"]
        assert run["verdict"] == "super"
        assert run["argv"][run["argv"].index("--device") + 1] == "cpu"
        assert run["argv"][run["argv"].index("--dtype") + 1] == "bfloat16"
    assert runs["planted --stream"]["impact"] == pytest.approx(
        runs["planted in memory"]["impact"], rel=1e-6
    )
