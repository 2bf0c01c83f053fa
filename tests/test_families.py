"""Many model families: their MLP output projections are located (by name or by structure),
and a spike pair planted in one is found by recording and spike candidates; a decoy is not."""

import warnings

import pytest
import torch

from sw_hooks.analysis.detect import run_detection, spike_candidates, verify
from sw_hooks.analysis.losses import EmbeddingCosine
from sw_hooks.core.locate import find_down_projections, layer_index
from sw_hooks.core.record import record
from sw_hooks.core.results import SuperWeight
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
    # layer 2 holds routed experts (recorded per expert) and a shared expert (a dense unit)
    "deepseek_v3": (
        "name",
        [*_layers("layers.{}.mlp.down_proj", 2), "layers.2.mlp.shared_experts.down_proj"],
    ),
    "bamba": ("structure", _layers("layers.{}.feed_forward.down_proj")),
    "hand_written": ("structure", _layers("blocks.{}.narrow")),
}


def _locate(model: torch.nn.Module):
    extra = {"example_input": family_input(model)} if isinstance(model, HandWritten) else {}
    return find_down_projections(model, **extra)


def test_every_family_has_an_expectation():
    assert set(EXPECTED) == set(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_is_located_with_how(family):
    found_by, names = EXPECTED[family]
    found = _locate(tiny_family(family, num_layers=3))
    assert list(found) == names
    assert found.found_by == dict.fromkeys(names, found_by)


def test_deepseek_dense_layers_and_shared_expert_are_dense_units_beside_its_experts():
    model = tiny_family("deepseek_v3", num_layers=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the shared expert is not "unhookable experts"
        with record(model) as recorder, torch.no_grad():
            model(**family_input(model))
    assert list(recorder.stats) == EXPECTED["deepseek_v3"][1]
    assert list(recorder.expert_stats) == ["layers.2.mlp.experts"]


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


def _planted_candidates(model: torch.nn.Module, names: list[str]) -> list[SuperWeight]:
    """A spike pair on every token in layer 1 and two decoys, as candidates (planted first)."""
    planted = plant_spike_pair(model, _in_layer(names, 1), 5, 17, on_every_token=True)
    plant_decoy(model, _in_layer(names, 1), 9, 33)
    plant_decoy(model, _in_layer(names, 0), 9, 33)
    return [
        SuperWeight(planted.module, 1, 5, 17, 8.0),
        SuperWeight(_in_layer(names, 1), 1, 9, 33, 8.0),
        SuperWeight(_in_layer(names, 0), 0, 9, 33, 8.0),
    ]


def _loss_options(model: torch.nn.Module, names: list[str]) -> dict:
    # A module without a Hugging Face config names its loss (and its units) itself.
    if isinstance(model, HandWritten):
        return {"loss_fn": EmbeddingCosine(), "modules": names}
    return {}


@pytest.mark.parametrize("family", FAMILIES)
def test_planted_super_weight_is_detected_and_verified_super(family):
    model = tiny_family(family, num_layers=3)
    names = list(_locate(model))
    planted = _planted_candidates(model, names)[0]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "skipping the experts", UserWarning)
        result = run_detection(model, family_input(model), **_loss_options(model, names))
    assert [(w.module, w.layer, w.row, w.col, w.verdict) for w in result.candidates] == [
        (planted.module, 1, 5, 17, "super")
    ]
    assert result.options["loss"] == "cosine"


@pytest.mark.parametrize("family", FAMILIES)
def test_verification_calls_the_planted_weight_super_and_decoys_not(family):
    model = tiny_family(family, num_layers=3)
    names = list(_locate(model))
    candidates = _planted_candidates(model, names)
    options = {k: v for k, v in _loss_options(model, names).items() if k == "loss_fn"}
    measured, baseline, _ = verify(model, candidates, family_input(model), **options)
    assert [w.verdict for w in measured] == ["super", "candidate", "candidate"]
    assert measured[0].impact >= 3.0
    assert [w.impact for w in measured[1:]] == pytest.approx([1.0, 1.0], abs=0.15)
    assert baseline is None


def test_cli_detect_verifies_a_saved_encoder_by_its_embeddings(tmp_path):
    """``sw-hooks detect`` on a BERT checkpoint: loaded as itself, verified with the cosine loss."""
    import json
    import subprocess
    import sys

    from sw_hooks.testing import save_checkpoint

    model = tiny_family("bert", num_layers=3)
    names = list(_locate(model))
    planted = _planted_candidates(model, names)[0]
    folder = tmp_path / "bert"
    save_checkpoint(model, folder)
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 8)
    out = tmp_path / "result.json"
    command = [sys.executable, "-m", "sw_hooks.cli", "detect", str(folder), "--text", str(text)]
    done = subprocess.run(
        [*command, "--json", str(out), "--quiet"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    found = [(w["module"], w["row"], w["col"], w["verdict"]) for w in result["candidates"]]
    assert found == [(planted.module, 5, 17, "super")]
    assert result["options"]["loss"] == "cosine"
