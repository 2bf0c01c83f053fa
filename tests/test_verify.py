"""Measuring candidates: prefix reuse is exact, screening keeps verdicts, fallbacks work."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from sw_hooks.analysis.impact import perplexity
from sw_hooks.analysis.prefix import find_blocks, kept_outputs, replayed_prefix
from sw_hooks.analysis.verify import VerifySettings, measure_impacts
from sw_hooks.core.locate import find_down_projections
from sw_hooks.core.masks import ablate
from sw_hooks.core.results import SuperWeight
from sw_hooks.testing import ARCHITECTURES, plant_super_weight, planted_llama, tiny_model

SUPER = SuperWeight("model.layers.1.mlp.down_proj", 1, 5, 17, 8.0)
DECOY = SuperWeight("model.layers.3.mlp.down_proj", 3, 9, 33, 8.0)
SECOND_DECOY = SuperWeight("model.layers.2.mlp.down_proj", 2, 11, 40, 8.0)
SMALL_WINDOWS = {"window": 64, "stride": 32}


def _reference_ratio(model, ids, weights, window, stride):
    """Today's measurement: full forwards, torchmetrics perplexity."""
    base = perplexity(model, ids, window=window, stride=stride)
    with ablate(model, weights):
        return perplexity(model, ids, window=window, stride=stride) / base


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_replaying_the_prefix_gives_the_logits_of_a_full_forward(arch):
    planted = plant_super_weight(
        tiny_model(arch, num_layers=4), 2, 5, 17, trigger_token=1, target_token=2
    )
    model, ids = planted.model, planted.calibration_ids(length=48)
    name = list(find_down_projections(model))[2]
    blocks, index = find_blocks(model, name)
    assert index == 2
    with torch.no_grad(), kept_outputs(blocks, {1}) as kept:
        model(ids)
    with torch.no_grad(), ablate(model, [(name, 5, 17)]):
        full = model(ids).logits
        with replayed_prefix(blocks, 2, kept[1]):
            replayed = model(ids).logits
    assert torch.equal(replayed, full)
    assert "forward" not in blocks[0].__dict__


def test_impacts_match_full_forwards_without_screening(planted):
    ids = planted.calibration_ids()
    settings = VerifySettings(screen_exponent=None, **SMALL_WINDOWS)
    measured = measure_impacts(planted.model, [SUPER, DECOY], ids, settings)
    assert measured.prefix_reused
    for weight in measured.weights:
        expected = _reference_ratio(planted.model, ids, [weight], **SMALL_WINDOWS)
        assert weight.impact == pytest.approx(expected, rel=1e-4)
    joint = _reference_ratio(planted.model, ids, [SUPER, DECOY], **SMALL_WINDOWS)
    assert measured.joint_ratio == pytest.approx(joint, rel=1e-4)
    assert measured.baseline_perplexity == pytest.approx(
        perplexity(planted.model, ids, **SMALL_WINDOWS), rel=1e-4
    )
    assert [w.verdict for w in measured.weights] == ["super", "candidate"]


def test_screening_stops_the_decoys_early_and_keeps_every_verdict(planted):
    """Two decoys fall below the bar after the first window: screened, their guard stays
    below it, so neither is measured again."""
    planted = plant_super_weight(planted, 2, 11, 40, trigger_token=5)
    ids = planted.calibration_ids()
    weights = [SUPER, DECOY, SECOND_DECOY]
    full = measure_impacts(
        planted.model, weights, ids, VerifySettings(screen_exponent=None, **SMALL_WINDOWS)
    )
    lines: list[str] = []
    fast = measure_impacts(
        planted.model, weights, ids, VerifySettings(**SMALL_WINDOWS), progress=lines.append
    )
    assert [w.verdict for w in fast.weights] == [w.verdict for w in full.weights]
    assert fast.weights[0].impact == pytest.approx(full.weights[0].impact, rel=1e-6)
    bar = 2.0**0.25
    for screened, measured in zip(fast.weights[1:], full.weights[1:], strict=True):
        assert screened.impact < bar and measured.impact < bar
    assert any("[9, 33]" in line and "screened" in line for line in lines)
    assert any("[11, 40]" in line and "screened" in line for line in lines)
    assert not any("[5, 17]" in line and "screened" in line for line in lines)
    assert fast.screened_joint_ratio < bar and not fast.screened_remeasured
    assert fast.forwards < full.forwards


def test_one_candidate_below_the_bar_is_not_screened(planted):
    """Its guard would cost what measuring it costs."""
    ids = planted.calibration_ids()
    fast = measure_impacts(planted.model, [SUPER, DECOY], ids, VerifySettings(**SMALL_WINDOWS))
    assert fast.screened_joint_ratio is None
    expected = _reference_ratio(planted.model, ids, [DECOY], **SMALL_WINDOWS)
    assert fast.weights[1].impact == pytest.approx(expected, rel=1e-5)


def test_prefix_reuse_costs_fewer_forwards_than_full_passes(planted):
    ids = planted.calibration_ids()
    settings = VerifySettings(screen_exponent=None, **SMALL_WINDOWS)
    reused = measure_impacts(planted.model, [DECOY], ids, settings)
    plain = measure_impacts(planted.model, [DECOY], ids, replace(settings, reuse_prefix=False))
    assert reused.weights[0].impact == pytest.approx(plain.weights[0].impact, rel=1e-5)
    windows = 7  # 256 tokens, window 64, stride 32
    assert plain.forwards == pytest.approx(windows * 3)
    # The decoy sits in the last of 4 blocks: per window the baseline and 2 x 1/4 block;
    # once, the replay check on 32 of the window's 64 tokens (a baseline and 1/4 block)
    # after a forward on 16 tokens that leaves other state behind.
    assert reused.forwards == pytest.approx(windows * 1.5 + 0.5 * 1.25 + 0.25)


class _Carry(nn.Module):
    """A block that leaves state behind for the next one: replaying it would be wrong."""

    def __init__(self, shared: dict, width: int = 8):
        super().__init__()
        self.shared = shared
        self.mlp = nn.Module()
        self.mlp.down_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        carried = self.shared.get("carry", 0)
        self.shared["carry"] = x.mean()
        return x + self.mlp.down_proj(x) + carried


class _StatefulModel(nn.Module):
    def __init__(self, vocab: int = 16, width: int = 8):
        super().__init__()
        shared: dict = {}
        self.embed = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList(_Carry(shared) for _ in range(3))
        self.head = nn.Linear(width, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        self.layers[0].shared.clear()
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def test_a_model_whose_blocks_share_state_is_measured_with_full_forwards():
    """One warning says why; the impact is that of full forwards."""
    torch.manual_seed(0)
    model = _StatefulModel().eval()
    ids = torch.randint(0, 16, (1, 40))
    weight = SuperWeight("layers.2.mlp.down_proj", 2, 1, 2, 0.0)
    settings = VerifySettings(screen_exponent=None, window=16, stride=8)
    with pytest.warns(RuntimeWarning, match="changes the logits; measuring with full forwards"):
        measured = measure_impacts(model, [weight], ids, settings)
    assert not measured.prefix_reused
    expected = _reference_ratio(model, ids, [weight], window=16, stride=8)
    assert measured.weights[0].impact == pytest.approx(expected, rel=1e-5)


def test_offload_hooks_survive_the_replay():
    accelerate = pytest.importorskip("accelerate")
    planted = planted_llama()
    ids = planted.calibration_ids()
    reference = measure_impacts(planted.model, [SUPER], ids, VerifySettings(**SMALL_WINDOWS))
    model = accelerate.cpu_offload(planted.model, execution_device="cpu")
    hooked = {i: layer.__dict__.get("forward") for i, layer in enumerate(model.model.layers)}
    measured = measure_impacts(model, [SUPER], ids, VerifySettings(**SMALL_WINDOWS))
    assert {
        i: layer.__dict__.get("forward") for i, layer in enumerate(model.model.layers)
    } == hooked
    assert measured.weights[0].impact == pytest.approx(reference.weights[0].impact, rel=1e-5)


def test_measurement_builds_no_autograd_graph() -> None:
    """Every forward of a measurement runs without gradients (a graph per window would cost
    memory and time, and nothing here is differentiated)."""
    planted = planted_llama()
    seen: list[bool] = []
    handle = planted.model.register_forward_pre_hook(
        lambda *_: seen.append(torch.is_grad_enabled())
    )
    try:
        weight = SuperWeight("model.layers.1.mlp.down_proj", 1, 5, 17, 0.0)
        measure_impacts(planted.model, [weight], planted.calibration_ids())
    finally:
        handle.remove()
    assert seen and not any(seen)
