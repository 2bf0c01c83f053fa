"""The scale benchmark's building blocks on a tiny Qwen2: model, planted weight, text, stages."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from safetensors import safe_open

from sw_hooks.analysis.detect import run_detection
from sw_hooks.models import load_model, tokenize

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(BENCHMARKS))  # for its `_common` import
        spec = importlib.util.spec_from_file_location("bench_scale", BENCHMARKS / "bench_scale.py")
        module = importlib.util.module_from_spec(spec)
        patch.setitem(sys.modules, "bench_scale", module)  # dataclasses look their module up
        spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tokenizer(bench, tmp_path_factory):
    return bench.save_byte_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def test_random_model_is_tied_and_every_weight_written(bench):
    model = bench.random_model(bench.qwen2_config("tiny"))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    # embeddings 512 * 64; per layer q 4160, k 2080, v 2080, o 4096, MLP 24576, norms 128
    assert bench.fp32_bytes(model) == 4 * (512 * 64 + 4 * 37120 + 64)
    fresh = type(model.model.rotary_emb)(config=model.config)
    assert torch.equal(model.model.rotary_emb.inv_freq, fresh.inv_freq)
    layer = model.model.layers[0]
    assert torch.equal(layer.input_layernorm.weight, torch.ones(64))
    assert torch.equal(layer.self_attn.q_proj.bias, torch.zeros(64))
    assert 0.015 < float(layer.mlp.down_proj.weight.detach().std()) < 0.025
    assert 0.9 < float(model.model.embed_tokens.weight.detach().std()) < 1.1


def test_calibration_text_puts_the_target_after_every_trigger(bench, tokenizer):
    ids = tokenize(tokenizer, bench.calibration_text(tokenizer, 2048))[0]
    assert ids.shape == (2048,)
    assert set(ids[0::4].tolist()) == {bench.TRIGGER_TOKEN}
    assert set(ids[1::4].tolist()) == {bench.TARGET_TOKEN}
    filler = torch.cat([ids[2::4], ids[3::4]])
    assert int(filler.min()) >= 16  # sw_hooks.testing reserves ids below 16


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_saved_checkpoint_loads_and_detect_verifies_the_planted_weight(bench, tmp_path, dtype):
    checkpoint = bench.write_checkpoint(tmp_path / "model", "tiny", tokens=2048, dtype=dtype)
    with safe_open(str(checkpoint.folder / "model.safetensors"), "pt") as saved:
        assert saved.get_tensor("model.norm.weight").dtype == getattr(torch, dtype)
    assert checkpoint.planted["module"] == "model.layers.2.mlp.down_proj"
    assert (checkpoint.planted["row"], checkpoint.planted["col"]) == (37, 101)
    assert checkpoint.parameters == 512 * 64 + 4 * 37120 + 64
    model, tokenizer = load_model(checkpoint.folder)
    assert model.dtype == getattr(torch, dtype)  # a checkpoint loads in its own dtype
    assert float(model.model.layers[2].mlp.down_proj.weight.detach()[37, 101]) == 8.0
    ids = tokenize(tokenizer, checkpoint.text_file.read_text(), max_tokens=1024)
    result = run_detection(model, ids[:, :128], calibration=ids)
    assert [(w.layer, w.row, w.col, w.verdict) for w in result.candidates] == [
        (2, 37, 101, "super")
    ]
    outcome = bench.planted_outcome(result.to_dict(), checkpoint.planted)
    assert (outcome["found"], outcome["verdict"]) == (True, "super")
    assert outcome["impact"] == result.candidates[0].impact


def test_planted_outcome_without_the_planted_weight(bench):
    planted = {"module": "model.layers.2.mlp.down_proj", "row": 37, "col": 101}
    other = {"module": "model.layers.3.mlp.down_proj", "layer": 3, "row": 37, "col": 101,
             "verdict": "candidate", "impact": 1.1}  # fmt: skip
    outcome = bench.planted_outcome({"candidates": [other]}, planted)
    assert (outcome["found"], outcome["verdict"], outcome["impact"]) == (False, None, None)
    assert outcome["candidates"] == [[3, 37, 101, "candidate"]]


LINES = [
    (1.0, "[sw-hooks] loading /tmp/m ..."),
    (2.0, "Loading weights: 100%|##| 5/5 [00:01<00:00, 5.0it/s]"),
    (4.0, "[sw-hooks] loading /tmp/m: done in 3.0 s"),
    (4.5, "[sw-hooks] detecting ..."),
    (6.0, "[sw-hooks] pass 1: 1 new candidate(s)"),
    (8.0, "[sw-hooks] pass 2: 0 new candidate(s)"),
    (12.0, "[sw-hooks] verify window 1/2: 2.1 forwards so far, about 4 s left"),
    (16.0, "[sw-hooks] verify window 2/2: 4.1 forwards so far, about 0 s left"),
    (16.5, "[sw-hooks] detecting: done in 12.0 s"),
    (17.0, "[sw-hooks] wrote /tmp/out.json"),
]


def test_stages_split_at_the_progress_lines(bench):
    found = bench.stages(LINES, total=18.0)
    assert [(s.name, s.start, s.end) for s in found] == [
        ("startup", 0.0, 1.0),
        ("loading", 1.0, 4.0),
        ("tokenizing", 4.0, 4.5),
        ("detection passes", 4.5, 8.0),
        ("verification", 8.0, 16.5),
        ("output", 16.5, 18.0),
    ]
    assert [line for _, line in found[3].lines] == [
        "[sw-hooks] pass 1: 1 new candidate(s)",
        "[sw-hooks] pass 2: 0 new candidate(s)",
    ]


def test_stage_report_says_where_time_left_is_shown_and_peak_memory(bench):
    samples = [bench.MemorySample(t, rss, rss - 10, 10) for t, rss in
               [(0.5, 100), (3.0, 900), (6.0, 700), (12.0, 800), (17.5, 50)]]  # fmt: skip
    reports = [bench.stage_report(s, samples) for s in bench.stages(LINES, total=18.0)]
    assert [(r["stage"], r["shows_time_left"]) for r in reports] == [
        ("startup", False),
        ("loading", True),  # the progress bar's "<00:00"
        ("tokenizing", False),
        ("detection passes", False),
        ("verification", True),
        ("output", False),
    ]
    assert [r["peak_rss_bytes"] for r in reports] == [100, 900, None, 700, 800, 50]
    assert reports[1]["peak_rss_anon_bytes"] == 890 and reports[1]["peak_rss_file_bytes"] == 10
    assert reports[4]["first_time_left_after_s"] == 4.0
    assert bench.memory_per_second(samples) == [
        [0, 100, 90, 10], [3, 900, 890, 10], [6, 700, 690, 10], [12, 800, 790, 10],
        [17, 50, 40, 10],
    ]  # fmt: skip


def test_run_command_times_lines_and_measures_peak_memory(bench, tmp_path):
    child = (
        "import sys, time\n"
        "sys.stderr.write('bar 1\\rbar 2\\n'); sys.stderr.flush(); time.sleep(0.3)\n"
        "block = bytearray(200 * 2**20)\n"
        "print('table'); sys.stderr.write('last\\n'); raise SystemExit(3)\n"
    )
    run = bench.run_command([sys.executable, "-c", child], tmp_path / "out.txt", every=0.05)
    assert run.returncode == 3
    assert [line for _, line in run.lines] == ["bar 1", "bar 2", "last"]
    assert run.lines[2][0] - run.lines[0][0] >= 0.3
    assert run.stdout == "table\n"
    assert run.peak_rss >= 200 * 2**20
    assert run.samples and all(s.rss > 0 for s in run.samples)


@pytest.mark.slow
def test_main_runs_detect_end_to_end_on_the_tiny_shape(bench, tmp_path):
    out = tmp_path / "scale.json"
    folder = tmp_path / "model"
    payload = bench.main(["--shape", "tiny", "--folder", str(folder), "--out", str(out)])
    written = json.loads(out.read_text())
    assert {k: v for k, v in written.items() if k != "environment"} == payload
    assert payload["returncode"] == 0
    assert (payload["found"], payload["verdict"]) == (True, "super")
    assert payload["candidates"] == [[2, 37, 101, "super"]]
    assert [s["stage"] for s in payload["stages"]] == [
        "startup", "loading", "tokenizing", "detection passes", "verification", "output",
    ]  # fmt: skip
    assert payload["peak_rss_bytes"] > payload["fp32_bytes"]
    assert not folder.exists()  # built here, so removed without --keep
