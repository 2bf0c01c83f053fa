"""Accelerate CPU and disk offload: record, detect and masks touch the real weights, and
detection with verification, perplexity, Table 1 and the residual trace give the answers
of the model held in memory, even when the input embedding itself is offloaded."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from sw_hooks.analysis.detect import run_detection, spike_candidates
from sw_hooks.analysis.impact import ImpactRow, perplexity, table1
from sw_hooks.analysis.trace import ResidualTrace, super_activation_trace
from sw_hooks.core.access import WeightElement
from sw_hooks.core.masks import ablate, scale
from sw_hooks.core.record import record
from sw_hooks.core.results import DetectionResult, SuperWeight
from sw_hooks.testing import PlantedModel, planted_llama

pytest.importorskip("accelerate")

SUPER = ("model.layers.1.mlp.down_proj", 5, 17)
DECOY = ("model.layers.3.mlp.down_proj", 9, 33)
DEVICE_MAP = {
    "model.embed_tokens": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.layers.2": "cpu",
    "model.layers.3": "disk",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "cpu",
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[PlantedModel, Path]:
    planted = planted_llama()
    folder = tmp_path_factory.mktemp("checkpoint")
    planted.model.save_pretrained(folder, safe_serialization=True)
    return planted, folder


def _offloaded(folder: Path, offload_folder: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        folder, device_map=DEVICE_MAP, offload_folder=offload_folder
    )
    return model.eval()


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def test_weights_really_are_offloaded(saved, tmp_path):
    model = _offloaded(saved[1], tmp_path)
    assert model.get_submodule(SUPER[0]).weight.device.type == "meta"
    assert model.get_submodule(DECOY[0]).weight.device.type == "meta"


def test_record_and_candidates_match_the_in_memory_model(saved, tmp_path):
    planted, folder = saved
    model = _offloaded(folder, tmp_path)
    with record(planted.model) as eager, torch.no_grad():
        planted.model(planted.prompt())
    with record(model) as offloaded, torch.no_grad():
        model(planted.prompt())
    assert set(offloaded.stats) == set(eager.stats)
    for name, stats in eager.stats.items():
        assert torch.equal(offloaded.stats[name].output.abs_max, stats.output.abs_max)
        assert torch.equal(offloaded.stats[name].input.abs_max, stats.input.abs_max)
    found = [w.coordinate for w in spike_candidates(model, offloaded.stats)]
    assert found == [SUPER, DECOY]
    assert WeightElement.resolve(model, SUPER).read_float() == 8.0


def test_ablate_changes_the_output_and_restores_exactly(saved, tmp_path):
    planted, folder = saved
    model = _offloaded(folder, tmp_path)
    checkpoint_before = _files(folder)
    ids = planted.prompt()
    before = _logits(model, ids)
    with ablate(model, [SUPER, DECOY]):
        assert WeightElement.resolve(model, SUPER).read_float() == 0.0
        ablated = _logits(model, ids)
    after = _logits(model, ids)
    # The same ablation on the in-memory model gives the same logits: the real weight moved.
    with ablate(planted.model, [SUPER, DECOY]):
        reference = _logits(planted.model, ids)
    assert not torch.equal(ablated, before)
    assert torch.equal(ablated, reference)
    assert torch.equal(after, before)
    assert WeightElement.resolve(model, SUPER).read_float() == 8.0
    assert _files(folder) == checkpoint_before  # the checkpoint on disk is never written


def test_scale_and_restore_on_accelerate_disk_offload(saved, tmp_path):
    from accelerate import disk_offload

    planted, _ = saved
    model = planted_llama().model
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    disk_offload(model, offload_dir=tmp_path / "offload", execution_device="cpu")
    ids = planted.prompt()
    before = _logits(model, ids)
    with scale(model, [SUPER], 0.5):
        assert WeightElement.resolve(model, SUPER).read_float() == 4.0
        halved = _logits(model, ids)
    assert not torch.equal(halved, before)
    assert torch.equal(_logits(model, ids), before)
    element = WeightElement.resolve(model, SUPER).read()
    assert element is not None and torch.equal(
        element.view(torch.int32), reference[f"{SUPER[0]}.weight"][5, 17].view(torch.int32)
    )


# Every weight, the input embedding's included, lives on the disk or in CPU memory by turns.
SPLIT_DEVICE_MAP = {
    "model.embed_tokens": "disk",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.layers.2": "cpu",
    "model.layers.3": "disk",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "disk",
}
SUPER_WEIGHT = SuperWeight(SUPER[0], 1, SUPER[1], SUPER[2], 8.0, token_position=0)


def _whole_model_on_disk(offload_dir: Path) -> torch.nn.Module:
    from accelerate import disk_offload

    model = planted_llama().model
    disk_offload(model, offload_dir=offload_dir, execution_device="cpu")
    return model


def _split_device_map(offload_dir: Path) -> torch.nn.Module:
    from accelerate import dispatch_model

    model = planted_llama().model
    return dispatch_model(model, SPLIT_DEVICE_MAP, main_device="cpu", offload_dir=offload_dir)


OFFLOADS: dict[str, Callable[[Path], torch.nn.Module]] = {
    "disk_offload": _whole_model_on_disk,
    "split device_map": _split_device_map,
}


@dataclass(frozen=True)
class Answers:
    """What the user asks of a model: detection with verification, perplexity, trace."""

    detection: DetectionResult
    perplexity: float
    traces: tuple[ResidualTrace, ResidualTrace]


def _answers(model: torch.nn.Module, planted: PlantedModel) -> Answers:
    calibration = planted.calibration_ids()
    return Answers(
        run_detection(model, planted.prompt(), calibration=calibration, verify_impact=True),
        perplexity(model, calibration, window=128, stride=64),
        super_activation_trace(model, planted.prompt(), SUPER_WEIGHT),
    )


def _table1(model: torch.nn.Module, super_weights: list[SuperWeight]) -> list[ImpactRow]:
    calibration = planted_llama().calibration_ids()
    return table1(model, calibration, super_weights, window=128, stride=64)


def _verified_super_weights(answers: Answers) -> list[SuperWeight]:
    return [w for w in answers.detection.candidates if w.verdict == "super"]


@pytest.fixture(scope="module")
def in_memory() -> Answers:
    planted = planted_llama()
    return _answers(planted.model, planted)


@pytest.fixture(scope="module")
def in_memory_table(in_memory: Answers) -> list[ImpactRow]:
    return _table1(planted_llama().model, _verified_super_weights(in_memory))


@pytest.fixture(scope="module", params=sorted(OFFLOADS))
def offloaded(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> torch.nn.Module:
    model = OFFLOADS[request.param](tmp_path_factory.mktemp("offload"))
    assert next(model.parameters()).device.type == "meta"
    assert model.get_input_embeddings().weight.device.type == "meta"
    return model


@pytest.fixture(scope="module")
def offloaded_answers(offloaded: torch.nn.Module) -> Answers:
    return _answers(offloaded, planted_llama())


def test_detection_with_verification_matches_the_in_memory_model(in_memory, offloaded_answers):
    expected, found = in_memory.detection, offloaded_answers.detection
    assert [w.coordinate for w in expected.candidates] == [SUPER, DECOY]
    assert [w.coordinate for w in found.candidates] == [SUPER, DECOY]
    assert [w.verdict for w in found.candidates] == ["super", "candidate"]
    assert [w.value for w in found.candidates] == [8.0, 8.0]
    for mine, theirs in zip(found.candidates, expected.candidates, strict=True):
        assert mine.impact == pytest.approx(theirs.impact, rel=1e-4)
    assert found.baseline_perplexity == pytest.approx(expected.baseline_perplexity, rel=1e-4)
    assert found.joint_ablation_ratio == pytest.approx(expected.joint_ablation_ratio, rel=1e-4)


def test_verification_leaves_the_offloaded_weights_as_they_were(offloaded, offloaded_answers):
    assert WeightElement.resolve(offloaded, SUPER).read_float() == 8.0
    assert WeightElement.resolve(offloaded, DECOY).read_float() == 8.0


def test_perplexity_matches_the_in_memory_model(in_memory, offloaded_answers):
    assert offloaded_answers.perplexity == pytest.approx(in_memory.perplexity, rel=1e-4)


def test_table1_matches_the_in_memory_model(in_memory, in_memory_table, offloaded):
    expected = in_memory_table
    found = _table1(offloaded, _verified_super_weights(in_memory))
    assert [r.condition for r in found] == [r.condition for r in expected]
    assert [r.weights_changed for r in found] == [0, 1, 4 * 7, 1]
    for mine, theirs in zip(found, expected, strict=True):
        for field in ("perplexity", "ratio", "kl_divergence", "top1_agreement"):
            assert getattr(mine, field) == pytest.approx(
                getattr(theirs, field), rel=1e-4, abs=1e-6
            ), (mine.condition, field)


def test_residual_trace_matches_the_in_memory_model(in_memory, offloaded_answers):
    for mine, theirs in zip(offloaded_answers.traces, in_memory.traces, strict=True):
        assert mine.layers == theirs.layers == (0, 1, 2, 3)
        assert mine.magnitudes == pytest.approx(theirs.magnitudes, rel=1e-4)
    original, ablated = offloaded_answers.traces
    assert original.magnitudes[-1] > 10 * ablated.magnitudes[-1]
