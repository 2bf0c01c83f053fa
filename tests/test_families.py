"""Many model families: their MLP output projections are located (by name or by structure),
and a spike pair planted in one is found by recording and spike candidates; a decoy is not."""

import warnings

import pytest
import torch

from sw_hooks.analysis.detect import spike_candidates
from sw_hooks.core.locate import find_down_projections, layer_index
from sw_hooks.core.record import record
from sw_hooks.testing import (
    FAMILIES,
    HandWritten,
    family_input,
    plant_decoy,
    plant_spike_pair,
    tiny_family,
)


def _layers(template: str, count: int = 3) -> list[str]:
    return [template.format(i) for i in range(count)]


def _interleaved(first: str, second: str) -> list[str]:
    # Ordered by layer index, then by name: decoder.* before encoder.* in each layer.
    return [name for i in range(3) for name in (first.format(i), second.format(i))]


EXPECTED: dict[str, tuple[str, list[str]]] = {
    "bert": ("structure", _layers("encoder.layer.{}.output.dense")),
    "roberta": ("structure", _layers("encoder.layer.{}.output.dense")),
    "modernbert": ("structure", _layers("layers.{}.mlp.Wo")),
    "vit": ("structure", _layers("layers.{}.mlp.fc2")),
    "clip_text": ("structure", _layers("encoder.layers.{}.mlp.fc2")),
    "t5": (
        "structure",
        _interleaved(
            "decoder.block.{}.layer.2.DenseReluDense.wo",
            "encoder.block.{}.layer.1.DenseReluDense.wo",
        ),
    ),
    "whisper": ("name", _interleaved("decoder.layers.{}.fc2", "encoder.layers.{}.fc2")),
    "gptj": ("structure", _layers("h.{}.mlp.fc_out")),
    "bloom": ("name", _layers("h.{}.mlp.dense_4h_to_h")),
    "phi": ("structure", _layers("layers.{}.mlp.fc2")),
    "deepseek_v3": ("name", _layers("layers.{}.mlp.down_proj", 2)),  # layer 2 is experts
    "bamba": ("structure", _layers("layers.{}.feed_forward.down_proj")),
    "hand_written": ("structure", _layers("blocks.{}.narrow")),
}


def _locate(model: torch.nn.Module):
    extra = {"example_input": family_input(model)} if isinstance(model, HandWritten) else {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "skipping the experts", UserWarning)
        return find_down_projections(model, **extra)


def test_every_family_has_an_expectation():
    assert set(EXPECTED) == set(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_is_located_with_how(family):
    found_by, names = EXPECTED[family]
    found = _locate(tiny_family(family, num_layers=3))
    assert list(found) == names
    assert found.found_by == dict.fromkeys(names, found_by)


def test_deepseek_dense_layers_are_located_and_its_experts_are_named():
    with pytest.warns(UserWarning, match="skipping the experts of layers.2.mlp.experts"):
        find_down_projections(tiny_family("deepseek_v3", num_layers=3))


def _in_layer(names: list[str], layer: int) -> str:
    """The module of ``layer``, the encoder's one in an encoder-decoder."""
    return next(n for n in names if layer_index(n) == layer and not n.startswith("decoder"))


@pytest.mark.parametrize("family", FAMILIES)
def test_planted_spike_pair_is_a_candidate_and_decoys_are_not(family):
    model = tiny_family(family, num_layers=3)
    names = list(_locate(model))
    planted = plant_spike_pair(model, _in_layer(names, 1), 5, 17)
    plant_decoy(model, _in_layer(names, 1), 9, 33)  # same layer, undriven input channel
    plant_decoy(model, _in_layer(names, 0), 9, 33)  # a quiet layer
    with record(model, names) as recorder, torch.no_grad():
        model(**family_input(model))
    candidates = spike_candidates(model, recorder.stats)
    assert [(w.module, w.layer, w.row, w.col) for w in candidates] == [(planted.module, 1, 5, 17)]
    assert candidates[0].value == 8.0
