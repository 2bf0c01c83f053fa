"""Accelerate CPU and disk offload: record, detect and masks touch the real weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sw_hooks.access import WeightElement
from sw_hooks.detect import spike_candidates
from sw_hooks.masks import ablate, scale
from sw_hooks.record import record
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
