"""Detection block by block (streamed from a checkpoint, or in memory) against detection in memory.

The planted tiny Llama: a causal super weight in block 1, a decoy in block 3 (the last).
With a 32-token prompt and 256 calibration tokens in windows of 128 (stride 64) there are
three windows, so screening applies: verification is two sweeps (window 1; windows 2-3).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sw_hooks.analysis.detect import run_detection
from sw_hooks.analysis.streamed import run_streamed_detection
from sw_hooks.core.results import DetectionResult
from sw_hooks.core.streaming import in_memory, open_streamed
from sw_hooks.models import load_model
from sw_hooks.testing import plant_super_weight, planted_llama, save_checkpoint, tiny_model
from sw_hooks.testing.moe import tiny_moe_model

WINDOWS = dict(window=128, stride=64)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_checkpoint(planted_llama().model, tmp_path_factory.mktemp("planted"))


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return planted_llama().calibration_ids(256)


def assert_same(streamed: DetectionResult, reference: DetectionResult, tolerance: float = 1e-6):
    """Same candidates (coordinates, values, activations, verdicts), impacts to ``tolerance``."""

    def fixed(w):
        return (w.module, w.row, w.col, w.value, w.input_activation, w.output_activation,
                w.token_position, w.verdict)  # fmt: skip

    assert [fixed(w) for w in streamed.candidates] == [fixed(w) for w in reference.candidates]
    for new, old in zip(streamed.candidates, reference.candidates, strict=True):
        assert new.impact == pytest.approx(old.impact, rel=tolerance)
    assert streamed.baseline_perplexity == pytest.approx(
        reference.baseline_perplexity, rel=tolerance
    )
    assert streamed.joint_ablation_ratio == pytest.approx(
        reference.joint_ablation_ratio, rel=tolerance
    )
    assert (streamed.passes, streamed.layer_peaks) == (reference.passes, reference.layer_peaks)
    assert streamed.options == reference.options


@pytest.mark.parametrize("screen_exponent", [0.25, None])
def test_streamed_from_the_checkpoint_equals_detection_in_memory(checkpoint, ids, screen_exponent):
    model, _ = load_model(checkpoint)
    options = dict(WINDOWS, screen_exponent=screen_exponent)
    reference = run_detection(model, ids[:, :32], calibration=ids, **options)
    run = run_streamed_detection(open_streamed(checkpoint), ids[:, :32], calibration=ids, **options)
    assert [w.verdict for w in reference.candidates] == ["super", "candidate"]
    assert_same(run.result, reference)
    # Record passes: all 4 blocks, then blocks 1-3; verification: 2 sweeps with screening, else 1.
    sweeps = 2 if screen_exponent is not None else 1
    assert (run.cost.sweeps, run.cost.block_loads) == (2 + sweeps, 4 + 3 + 4 * sweeps)


def test_block_runs_head_positions_and_bytes_are_counted_exactly(checkpoint, ids):
    streamed = open_streamed(checkpoint)
    resident = streamed.bytes_read
    block = sum(
        p.numel() * p.element_size() for p in planted_llama().model.model.layers[0].parameters()
    )
    run = run_streamed_detection(streamed, ids[:, :32], calibration=ids, **WINDOWS)
    # Block runs, in 128-token windows over 4 blocks: prompt pass 1 (4 x 1/4), pass 2 from
    # block 1 (3 x 1/4); each window: baseline 4, super weight 3, decoy 1, joint 3 (the
    # decoy, alone below the screening bar, is not screened: its guard would cost as much).
    assert run.cost.forwards == pytest.approx((1 + 0.75 + 3 * 11) / 4, abs=1e-12)
    # The LM head: window 1 all 128 positions x 4 streams; windows 2-3 the 64 scored tokens'
    # 65 positions (the last one dropped) x 4 streams.
    assert run.cost.head_positions == 128 * 4 + 2 * 65 * 4
    # Every loaded block read once; besides, only the spiking down-projections' weights.
    extra = run.cost.bytes_read - resident - run.cost.block_loads * block
    down_proj = 64 * 128 * 4
    assert extra % down_proj == 0 and 0 < extra // down_proj <= 2 * run.result.passes


def test_one_block_in_memory_at_a_time(checkpoint, ids):
    streamed = open_streamed(checkpoint)
    loaded_counts: list[int] = []

    def count(module, args, kwargs):
        loaded = [any(not p.is_meta for p in b.parameters()) for b in streamed.blocks]
        loaded_counts.append(sum(loaded))

    handles = [b.register_forward_pre_hook(count, with_kwargs=True) for b in streamed.blocks]
    try:
        run_streamed_detection(streamed, ids[:, :32], calibration=ids, **WINDOWS)
    finally:
        for handle in handles:
            handle.remove()
    assert loaded_counts and max(loaded_counts) == 1
    assert all(p.is_meta for p in streamed.blocks.parameters())
    assert not any(p.is_meta for n, p in streamed.model.named_parameters() if ".layers." not in n)


@pytest.mark.parametrize("arch", ["falcon", "gemma2", "gpt2"])
def test_block_by_block_in_memory_across_block_conventions(arch):
    """Falcon's blocks return tuples, Gemma2 alternates sliding and global attention masks,
    GPT-2 names its blocks ``transformer.h``: each gives what detection in memory gives."""
    planted = plant_super_weight(
        tiny_model(arch, num_layers=4), 1, 5, 17, trigger_token=1, target_token=2
    )
    ids = planted.calibration_ids(256)
    reference = run_detection(planted.model, ids[:, :32], calibration=ids, **WINDOWS)
    run = run_streamed_detection(in_memory(planted.model), ids[:, :32], calibration=ids, **WINDOWS)
    assert reference.verified and reference.verified[0].layer == 1
    assert_same(run.result, reference)
    assert run.cost.bytes_read == 0


def test_experts_are_refused_with_one_clear_error():
    with pytest.raises(ValueError, match="dense down-projections only|no list of decoder blocks"):
        run_streamed_detection(
            in_memory(tiny_moe_model("qwen2_moe", num_layers=2)), torch.tensor([[20, 21, 22]])
        )


# -- the command ----------------------------------------------------------------------------------
def _text(pieces: int = 64, seed: int = 0) -> str:
    """Byte-tokenizer text: trigger '"', target '#', two letters, the decoy's trigger '$', a letter."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    return "".join('"#' + rng.choice(letters) + rng.choice(letters) + "$" + rng.choice(letters)
                   for _ in range(pieces))  # fmt: skip


def _detect(folder: Path, out: Path, *extra: str) -> dict:
    text = folder / "text.txt"
    text.write_text(_text())
    command = [sys.executable, "-m", "sw_hooks.cli", "detect", str(folder), "--text", str(text),
               "--json", str(out), "--quiet", *extra]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(out.read_text())


def test_cli_stream_gives_the_in_memory_result(checkpoint, tmp_path):
    streamed = DetectionResult.from_dict(_detect(checkpoint, tmp_path / "s.json", "--stream"))
    reference = DetectionResult.from_dict(_detect(checkpoint, tmp_path / "m.json"))
    assert [w.verdict for w in reference.candidates][:1] == ["super"]
    assert_same(streamed, reference)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["detect", "--stream"], "--stream reads a safetensors checkpoint folder"),
        (["detect", "/nonexistent/folder", "--stream"], "--stream reads a safetensors checkpoint"),
    ],
)
def test_cli_stream_bad_input_exits_2_with_one_line(argv, message, capsys):
    from sw_hooks.cli import main

    assert main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_cli_stream_takes_no_device_map(checkpoint, capsys):
    from sw_hooks.cli import main

    assert main(["detect", str(checkpoint), "--stream", "--device-map", "auto", "--quiet"]) == 2
    assert "takes no --device-map" in capsys.readouterr().err


def test_cli_stream_folder_without_safetensors(tmp_path, capsys):
    from sw_hooks.cli import main

    (tmp_path / "config.json").write_text("{}")
    assert main(["detect", str(tmp_path), "--stream", "--quiet"]) == 2
    assert "needs config.json and .safetensors" in capsys.readouterr().err
