"""Prefix reuse is checked at every block it starts from, and a replay that fails falls back.

The models here are tiny Llamas whose block 2 reads what block 0's MLP left behind (as
KV-sharing models such as Gemma-3n read an earlier layer's keys and values), with a
planted super weight in block 0 and another in block 2: replaying blocks 0 and 1 for the
block-2 weight skips the write, so block 2 reads a stale value (or, if the model clears
its shared state per call, none at all).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from sw_hooks.analysis.detect import run_detection
from sw_hooks.analysis.prefix import PROBE_TOKENS
from sw_hooks.testing import PlantedModel, plant_super_weight, tiny_model

WINDOWS = {"window": 64, "stride": 32}


def _shared_state_model(clear_per_call: bool, from_tokens: int = 0) -> PlantedModel:
    """Planted weights in blocks 0 and 2; block 2's attention adds block 0's MLP output
    (on inputs longer than ``from_tokens``)."""
    planted = plant_super_weight(
        tiny_model("llama", num_layers=4), 0, 5, 17, trigger_token=1, target_token=2
    )
    planted = plant_super_weight(planted, 2, 9, 33, trigger_token=3, target_token=4)
    model = planted.model
    shared: dict[str, torch.Tensor] = {}
    layers = model.model.layers

    def keep(module: nn.Module, args: object, output: torch.Tensor) -> None:
        shared["kv"] = output

    def read(module: nn.Module, args: object, output: tuple) -> tuple:
        if output[0].shape[1] <= from_tokens:
            return output
        return (output[0] + 4.0 * shared["kv"], *output[1:])

    layers[0].mlp.register_forward_hook(keep)
    layers[2].self_attn.register_forward_hook(read)
    if clear_per_call:
        model.register_forward_pre_hook(lambda *_: shared.clear())
    return planted


def _impacts(planted: PlantedModel, **options: object) -> dict[tuple[int, int, int], float]:
    result = run_detection(
        planted.model,
        planted.prompt(),
        calibration=planted.calibration_ids(length=128),
        **WINDOWS,
        **options,
    )
    return {(w.layer, w.row, w.col): w.impact for w in result.candidates}


def _with_warnings(planted: PlantedModel) -> tuple[dict, list[str]]:
    """Impacts with prefix reuse, and the prefix-reuse warnings raised while measuring."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = _impacts(planted)
    return found, [str(w.message) for w in caught if "prefix reuse" in str(w.message)]


def _full_forward_impacts(planted: PlantedModel) -> dict[tuple[int, int, int], float]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no replay, so nothing to warn about
        return _impacts(planted, reuse_prefix=False)


def test_state_left_for_a_later_block_is_caught_and_measured_with_full_forwards():
    planted = _shared_state_model(clear_per_call=False)
    expected = _full_forward_impacts(planted)
    assert {(0, 5, 17), (2, 9, 33)} <= set(expected)
    found, warned = _with_warnings(planted)
    assert found.keys() == expected.keys()
    for key, impact in expected.items():
        assert found[key] == pytest.approx(impact, rel=1e-5, abs=0), key
    # The stale state has the half-probe's length: a shape error, or other values.
    assert len(warned) == 1 and "before block 2" in warned[0], warned


def test_a_replay_that_raises_falls_back_to_full_forwards_with_one_warning():
    planted = _shared_state_model(clear_per_call=True)
    expected = _full_forward_impacts(planted)
    found, warned = _with_warnings(planted)
    for key, impact in expected.items():
        assert found[key] == pytest.approx(impact, rel=1e-5, abs=0), key
    assert len(warned) == 1 and "raised KeyError: 'kv'" in warned[0], warned


def test_a_replay_that_raises_after_the_check_falls_back_mid_measurement():
    """The check's probe is too short to show this model's failure; the windows are not."""
    planted = _shared_state_model(clear_per_call=True, from_tokens=PROBE_TOKENS)
    expected = _full_forward_impacts(planted)
    found, warned = _with_warnings(planted)
    for key, impact in expected.items():
        assert found[key] == pytest.approx(impact, rel=1e-5, abs=0), key
    assert len(warned) == 1 and "raised KeyError: 'kv'" in warned[0], warned
