"""benchmarks/scale_plan.py's bytes-read formulas against what runs read, on a tiny model.

One super weight planted in block 1 of 4, three windows (screening on), two record passes:
the run the formulas assume. Streamed: the bytes the engine reads. Disk offload: every
block a forward runs is read at that forward, so it reads what the in-memory detection
runs, counted as calls of each block's MLP (a block replayed by prefix reuse calls nothing).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from sw_hooks.analysis.detect import run_detection
from sw_hooks.analysis.streamed import run_streamed_detection
from sw_hooks.core.streaming import open_streamed
from sw_hooks.testing import plant_super_weight, save_checkpoint, tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from scale_plan import bytes_read  # noqa: E402

OPTIONS = dict(window=128, stride=64)


@pytest.fixture(scope="module")
def planted():
    return plant_super_weight(
        tiny_model("llama", num_layers=4), 1, 5, 17, trigger_token=1, target_token=2
    )


def _bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _sizes(model: torch.nn.Module) -> tuple[int, int, int]:
    blocks = _bytes(model.model.layers)
    return _bytes(model) - blocks, blocks, _bytes(model.model.layers[0].mlp.down_proj)


def test_streamed_reads_what_the_formula_says(planted, tmp_path):
    ids = planted.calibration_ids(256)
    streamed = open_streamed(save_checkpoint(planted.model, tmp_path))
    run = run_streamed_detection(streamed, ids[:, :32], calibration=ids, **OPTIONS)
    assert run.result.passes == 2 and len(run.result.candidates) == 1
    ends, blocks, down_proj = _sizes(planted.model)
    spiking = run.cost.bytes_read - bytes_read(ends, blocks, 1, 4)["streamed"]
    assert spiking % down_proj == 0 and 1 <= spiking // down_proj <= 2  # one per pass at most


def test_disk_offload_reads_what_the_formula_says(planted):
    ids = planted.calibration_ids(256)
    runs = [0] * 4

    def counter(index: int):
        def count(module, args, output):
            runs[index] += 1

        return count

    layers = planted.model.model.layers
    handles = [layer.mlp.register_forward_hook(counter(i)) for i, layer in enumerate(layers)]
    try:
        result = run_detection(planted.model, ids[:, :32], calibration=ids, **OPTIONS)
    finally:
        for handle in handles:
            handle.remove()
    assert result.passes == 2 and len(result.candidates) == 1
    ends, blocks, _ = _sizes(planted.model)
    read = ends + sum(runs) * blocks // 4
    assert read == pytest.approx(bytes_read(ends, blocks, 1, 4)["disk offload"], abs=1)
