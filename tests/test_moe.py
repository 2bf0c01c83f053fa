"""Mixture-of-experts: locating, per-expert recording, detection, pruning and expert masks."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from sw_hooks.analysis.detect import detect_expert_weights, find_candidates
from sw_hooks.analysis.super_experts import (
    detect_super_experts,
    prune_experts,
    super_expert_candidates,
    super_expert_mask,
)
from sw_hooks.core import expert_record
from sw_hooks.core.access import WeightElement
from sw_hooks.core.experts import find_experts, fused_down_projection
from sw_hooks.core.locate import find_down_projections
from sw_hooks.core.masks import ablate, preserve, restore_activation, scale
from sw_hooks.core.record import ExpertRecorder, record, record_experts
from sw_hooks.core.results import SuperWeight
from sw_hooks.testing import MOE_ARCHITECTURES, planted_moe, tiny_moe_model, to_expert_list

SUPER_WEIGHT = ("model.layers.1.mlp.experts.down_proj", 3, 5, 17)
SUPER_WEIGHT_COORDINATE = ("model.layers.1.mlp.experts.down_proj", 3, 5, 17)


@pytest.fixture(scope="module", params=MOE_ARCHITECTURES)
def planted(request):
    return planted_moe(request.param)


@pytest.fixture(scope="module")
def mixtral():
    return planted_moe("mixtral")


def _router_counts(model: nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """Tokens per expert from the router's own logits (the model's output, no hooks of ours)."""
    with torch.no_grad():
        logits = model(ids, output_router_logits=True).router_logits
    top_k = model.config.num_experts_per_tok
    experts = logits[0].shape[-1]
    return [
        torch.bincount(layer.topk(top_k).indices.flatten(), minlength=experts) for layer in logits
    ]


def test_find_experts_names_every_layer(planted):
    experts = find_experts(planted.model)
    assert list(experts) == [f"model.layers.{i}.mlp.experts" for i in range(4)]
    assert {(e.layout, e.num_experts) for e in experts.values()} == {("fused", 8)}


def test_routing_counts_equal_router_choices(planted):
    ids = planted.calibration_ids(length=48)
    with record_experts(planted.model) as recorder, torch.no_grad():
        planted.model(ids)
    expected = _router_counts(planted.model, ids)
    counts = [s.tokens for s in recorder.stats.values()]
    assert [c.tolist() for c in counts] == [e.tolist() for e in expected]
    assert int(counts[0].sum()) == 48 * planted.model.config.num_experts_per_tok


def test_planted_expert_weight_and_super_expert_are_found_exactly(planted):
    candidates, _ = find_candidates(planted.model, planted.prompt(), modules=[], experts=True)
    assert [(w.layer, w.expert, w.row, w.col) for w in candidates] == [(1, 3, 5, 17)]
    assert candidates[0].module == SUPER_WEIGHT[0]
    assert candidates[0].value == pytest.approx(8.0)
    with record_experts(planted.model, inputs=False) as recorder, torch.no_grad():
        planted.model(planted.prompt())
    flagged = super_expert_candidates(recorder.stats, percentile=90.0)
    assert [(e.layer, e.expert, e.channel) for e in flagged] == [(1, 3, 5), (2, 6, 9)]
    # With the published 99.5th percentile over 32 experts only the largest clears the bar.
    assert len(super_expert_candidates(recorder.stats)) == 1


def test_detection_verifies_by_ablation_and_pruning(mixtral):
    calibration = mixtral.calibration_ids(length=96)
    result = detect_expert_weights(mixtral.model, mixtral.prompt(), calibration=calibration)
    assert [(w.expert, w.row, w.col, w.verdict) for w in result.candidates] == [(3, 5, 17, "super")]
    found = detect_super_experts(
        mixtral.model, mixtral.prompt(), calibration=calibration, percentile=90.0
    )
    assert [(e.layer, e.expert, e.verdict) for e in found] == [(1, 3, "super"), (2, 6, "super")]
    assert all(e.impact > 2.0 for e in found)


def test_recorded_values_match_the_experts_own_down_projection(mixtral):
    model, ids = mixtral.model, mixtral.prompt()
    experts = model.model.layers[2].mlp.experts
    hidden: list[torch.Tensor] = []
    handle = model.model.layers[2].mlp.register_forward_pre_hook(
        lambda m, a: hidden.append(a[0].reshape(-1, a[0].shape[-1]))
    )
    with record_experts(model) as recorder, torch.no_grad():
        model(ids)
    handle.remove()
    # The trigger token (position 2) is routed to expert 6; its output spikes at row 9.
    with torch.no_grad():
        _, out = fused_down_projection(experts, hidden[0][2:3], 6)
    stats = recorder.stats["model.layers.2.mlp.experts"].expert(6)
    assert float(stats.output.abs_max[9]) == pytest.approx(float(out[0, 9].abs()), rel=1e-5)
    assert int(stats.output.token[9]) == 2 and int(stats.output.batch[9]) == 0


def test_list_layout_records_and_detects_the_same(mixtral):
    fused = mixtral.model
    listed = to_expert_list(planted_moe("mixtral").model)
    units = find_experts(listed)
    assert {u.layout for u in units.values()} == {"list"}
    assert units["model.layers.1.mlp.experts"].coordinate_name(3) == (
        "model.layers.1.mlp.experts.3.down_proj"
    )
    ids = mixtral.calibration_ids(length=32)
    stats = []
    for model in (fused, listed):
        with record_experts(model) as recorder, torch.no_grad():
            model(ids)
        stats.append(recorder.stats)
    for name, a in stats[0].items():
        b = stats[1][name]
        assert a.tokens.tolist() == b.tokens.tolist()
        torch.testing.assert_close(a.output.abs_max, b.output.abs_max, rtol=1e-4, atol=1e-5)
    candidates, _ = find_candidates(listed, mixtral.prompt(), modules=[], experts=True)
    assert [(w.module, w.expert, w.row, w.col) for w in candidates] == [
        ("model.layers.1.mlp.experts.3.down_proj", 3, 5, 17)
    ]


def test_pruning_an_expert_equals_dropping_its_output(mixtral):
    model, ids = mixtral.model, mixtral.prompt()
    listed = to_expert_list(planted_moe("mixtral").model)
    with torch.no_grad():
        before = model(ids).logits
        with prune_experts(model, ("model.layers.2.mlp.experts", 6)):
            fused_pruned = model(ids).logits
        with prune_experts(listed, ("model.layers.2.mlp.experts", 6)):
            list_pruned = listed(ids).logits
        after = model(ids).logits
    torch.testing.assert_close(fused_pruned, list_pruned, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(before, fused_pruned)
    assert torch.equal(before, after)  # hooks gone, nothing changed
    with pytest.raises(ValueError, match="has no expert 8"):
        prune_experts(model, ("model.layers.2.mlp.experts", 8))


def test_masks_address_expert_weights_and_restore_exactly(mixtral):
    model = mixtral.model
    down = model.model.layers[1].mlp.experts.down_proj
    original = down.detach().clone()
    weight = SuperWeight(SUPER_WEIGHT[0], 1, 5, 17, 8.0, expert=3)
    with ablate(model, SUPER_WEIGHT):
        assert float(down.detach()[3, 5, 17]) == 0.0
        assert float(down.detach()[2, 5, 17]) == float(original[2, 5, 17])
    with scale(model, [weight], 0.5):
        assert float(down.detach()[3, 5, 17]) == pytest.approx(4.0)
    with preserve(model, [weight]):
        down.data[3, 5, 17] = 1.0
    assert torch.equal(down, original)
    with pytest.raises(ValueError, match="expert 8 is outside"):
        ablate(model, [SUPER_WEIGHT[:1] + (8, 5, 17), SUPER_WEIGHT])
    assert torch.equal(down, original)
    with pytest.raises(ValueError, match="cannot restore inside expert 3"):
        restore_activation(model, [weight])
    listed = to_expert_list(planted_moe("mixtral", num_layers=3).model)
    element = WeightElement.resolve(listed, ("model.layers.1.mlp.experts.3.down_proj", 3, 5, 17))
    assert element.read_float() == pytest.approx(8.0)
    with pytest.raises(ValueError, match="not expert 2"):
        WeightElement.resolve(listed, ("model.layers.1.mlp.experts.3.down_proj", 2, 5, 17))


def test_padding_is_left_out_of_counts_and_maxima(mixtral):
    model = mixtral.model
    ids = torch.tensor([[3, 20, 21, 22], [20, 21, 22, 23]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    with record_experts(model) as recorder, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    layer2 = recorder.stats["model.layers.2.mlp.experts"]
    assert int(layer2.tokens.sum()) == 7 * 2
    # The padded trigger (token 3) would have driven expert 6's row 9 to its planted spike.
    assert float(layer2.expert(6).output.abs_max[9]) < 50.0


def _qwen2_moe_with_a_dense_layer():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "qwen2_moe",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=4,
        mlp_only_layers=[0],
    )
    return AutoModelForCausalLM.from_config(config)


def test_dense_units_and_experts_are_located_once_and_recorded_together():
    model = _qwen2_moe_with_a_dense_layer()
    dense = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.shared_expert.down_proj"]
    assert list(find_down_projections(model)) == dense
    with record(model) as recorder, torch.no_grad():
        model(torch.tensor([[1, 2, 3, 4, 5]]))
    assert list(recorder.stats) == dense
    assert list(recorder.expert_stats) == ["model.layers.1.mlp.experts"]
    routed = int(recorder.expert_stats["model.layers.1.mlp.experts"].tokens.sum())
    assert routed == 5 * model.config.num_experts_per_tok
    experts = [u for u in recorder.units if u.expert is not None]
    assert {u.module for u in experts} == {"model.layers.1.mlp.experts.down_proj"}
    assert sum(recorder.units[u].calls for u in experts) == routed
    with pytest.raises(ValueError, match=r"Its experts \(model\.layers\.0\.mlp\.experts\)"):
        find_down_projections(tiny_moe_model("olmoe", num_layers=1))


class _OpaqueExperts(nn.Module):
    """Experts whose parameters are fused but whose call takes no routing indices."""

    def __init__(self) -> None:
        super().__init__()
        self.down_proj = nn.Parameter(torch.zeros(4, 8, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_unhookable_experts_are_named_in_a_warning():
    model = tiny_moe_model("mixtral", num_layers=2)
    model.model.layers[1].mlp.experts = _OpaqueExperts()
    with pytest.warns(UserWarning, match=r"cannot hook the experts of model\.layers\.1\.mlp\b"):
        found = find_experts(model)
    assert list(found) == ["model.layers.0.mlp.experts"]


def test_super_expert_mask_is_the_published_criterion():
    peaks = torch.tensor([1.0] * 199 + [5.0])
    assert super_expert_mask(peaks).nonzero().flatten().tolist() == [199]
    # Above the percentile but below a tenth of the largest: not super.
    peaks = torch.tensor([1.0] * 198 + [9.0, 100.0])
    assert super_expert_mask(peaks, percentile=99.0).nonzero().flatten().tolist() == [199]
    with pytest.raises(ValueError, match="percentile"):
        super_expert_mask(peaks, percentile=101.0)


def test_expert_weights_round_trip_json(tmp_path):
    from sw_hooks.core.results import load_super_weights, save_super_weights

    weight = SuperWeight(SUPER_WEIGHT[0], 1, 5, 17, 8.0, expert=3)
    save_super_weights([weight], tmp_path / "w.json")
    assert load_super_weights(tmp_path / "w.json", candidates=True) == [weight]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert WeightElement.resolve(planted_moe("mixtral", num_layers=3).model, weight).expert == 3


@pytest.mark.parametrize("mode", ["restore", "freeze"])
def test_guard_holds_a_fused_expert_weight_through_adamw(mode):
    from sw_hooks.training.guard import WeightGuard

    planted = planted_moe("mixtral")
    model = planted.model
    model.train()
    weight = next(p for p in planted.planted if getattr(p, "expert", None) is not None)
    coordinate = (weight.module, weight.expert, weight.row, weight.col)
    element = WeightElement.resolve(model, coordinate)
    before = element.parameter.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.0)
    ids = torch.randint(16, 256, (2, 16))
    with WeightGuard(model, [coordinate], mode=mode).attach(optimizer):
        for _ in range(3):
            optimizer.zero_grad()
            model(ids, labels=ids).loss.backward()
            optimizer.step()
    after = element.parameter.detach()
    assert after[element.storage_index] == before[element.storage_index]
    assert not torch.equal(after, before)  # its neighbours moved


def test_monitor_tracks_expert_weights(planted):
    from sw_hooks.training.monitor import SpikeTracker, watch

    tracker = SpikeTracker([("model.layers.1.mlp.experts.down_proj", 3, 5, 17)])
    with watch(planted.model, tracker) as watcher, torch.no_grad():
        planted.model(planted.prompt())
    (weight,) = tracker.super_weights
    assert (weight.module, weight.expert, weight.row, weight.col) == SUPER_WEIGHT_COORDINATE
    assert weight.value == pytest.approx(8.0)
    assert weight.output_activation > 100
    assert watcher.values["sw/watch/layer_1.expert_3.row_5.col_17/value"] == pytest.approx(8.0)
    assert not [e for e in watcher.events if e.kind != "found"]


def test_expert_index_must_match_the_module_path():
    # Expert 1 equals the layer index: a digit search in the name would accept it.
    listed = to_expert_list(planted_moe("mixtral").model)
    name = "model.layers.1.mlp.experts.3.down_proj"
    weight = listed.get_submodule(name).weight
    before = weight.detach().clone()
    with pytest.raises(ValueError, match="belongs to expert 3, not expert 1"):
        ablate(listed, [(name, 1, 5, 17)])
    assert torch.equal(weight, before)
    with ablate(listed, [(name, 3, 5, 17)]):
        assert float(weight.detach()[5, 17]) == 0.0
    assert torch.equal(weight, before)


class _BatchWrapper(nn.Module):
    """Like a LightningModule: takes the whole batch, passes the mask to the model it holds."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, batch: dict) -> torch.Tensor:
        return self.net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


def test_expert_recording_through_a_wrapper_leaves_padding_out(mixtral):
    ids = mixtral.calibration_ids(length=24).repeat(2, 1)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0  # left padding in the second row
    batch = {"input_ids": ids, "attention_mask": mask}
    with record_experts(mixtral.model) as direct, torch.no_grad():
        mixtral.model(**batch)
    wrapper = _BatchWrapper(mixtral.model)
    with record_experts(wrapper) as wrapped, torch.no_grad():
        wrapper(batch)
    for name, expected in direct.stats.items():
        got = wrapped.stats[f"net.{name}"]
        assert got.tokens.tolist() == expected.tokens.tolist()
        assert int(got.tokens.sum()) == 39 * mixtral.model.config.num_experts_per_tok
        assert torch.equal(got.output.abs_max, expected.output.abs_max)


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm"])
def test_recording_runs_each_expert_once_and_leaves_the_output_unchanged(
    implementation, monkeypatch
):
    planted = planted_moe("olmoe")
    model, ids = planted.model, planted.calibration_ids(length=32)
    model.set_experts_implementation(implementation)
    recomputed: list[int] = []

    def counting(experts, hidden, expert):
        recomputed.append(expert)
        return fused_down_projection(experts, hidden, expert)

    monkeypatch.setattr(expert_record, "fused_down_projection", counting)
    with torch.no_grad():
        plain = model(ids).logits
        with record_experts(model) as recorder:
            recorded = model(ids).logits
    assert recomputed == []
    assert torch.equal(recorded, plain)
    assert int(recorder.stats["model.layers.0.mlp.experts"].tokens.sum()) == 32 * 2
    assert all("forward" not in vars(e.module) for e in find_experts(model).values())


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm", "eager"])
def test_recording_from_the_kernel_equals_recomputing(planted, implementation):
    model = planted.model
    ids = torch.cat([planted.prompt(), planted.calibration_ids(length=planted.prompt().shape[1])])
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    model.set_experts_implementation(implementation)
    stats = []
    try:
        for recompute in (False, True):
            with ExpertRecorder(model, _recompute=recompute) as recorder, torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
            stats.append(recorder.stats)
    finally:
        model.set_experts_implementation("grouped_mm")
    observed, recomputed = stats
    assert list(observed) == list(recomputed)
    for name, a in observed.items():
        b = recomputed[name]
        assert a.tokens.tolist() == b.tokens.tolist() and a.calls == b.calls == 1
        for side in ("input", "output"):
            x, y = getattr(a, side), getattr(b, side)
            torch.testing.assert_close(x.abs_max, y.abs_max, rtol=1e-5, atol=1e-6)
            assert torch.equal(x.token, y.token) and torch.equal(x.batch, y.batch)


def test_experts_stay_findable_and_prunable_while_recorded(mixtral):
    model, ids = mixtral.model, mixtral.calibration_ids(length=16)
    with record_experts(model) as outer, torch.no_grad():
        assert list(find_experts(model)) == list(outer.experts)
        with (
            record_experts(model) as inner,
            prune_experts(model, ("model.layers.2.mlp.experts", 6)),
        ):
            model(ids)
    for name, stats in outer.stats.items():
        assert stats.tokens.tolist() == inner.stats[name].tokens.tolist()
        # The outer recorder reads the kernel, the inner one (forward taken) recomputes.
        torch.testing.assert_close(
            stats.output.abs_max, inner.stats[name].output.abs_max, rtol=1e-5, atol=1e-6
        )
