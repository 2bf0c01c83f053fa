import gc
import weakref

import pytest
import torch
from torch import nn

from sw_hooks.core.record import (
    ChannelStats,
    channel_maxima,
    merge_channel_maxima,
    record,
    stats_from_state_dict,
)
from sw_hooks.testing import ARCHITECTURES, plant_super_weight, planted_llama, tiny_model


def _plant(arch: str):
    planted = plant_super_weight(tiny_model(arch), 1, 5, 17, trigger_token=1, target_token=2)
    return plant_super_weight(planted, 3, 9, 33, trigger_token=3)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_planted_spikes_are_recorded_at_exact_channels(arch):
    planted = _plant(arch)
    prompt = planted.prompt()  # tokens: 1 2 3 <filler> ...
    with record(planted.model) as rec, torch.no_grad():
        planted.model(prompt)
    for p in planted.planted:
        stats = rec.stats[p.module]
        assert stats.input.top()[0] == p.col
        assert stats.output.top()[0] == p.row
        trigger_position = prompt[0].tolist().index(p.trigger_token)
        assert int(stats.output.token[p.row]) == trigger_position
        # the output spike is the planted weight times the input spike, nothing else
        expected = p.value * float(stats.input.value[p.col])
        assert float(stats.output.value[p.row]) == pytest.approx(expected, rel=1e-3)


def test_channel_maxima_values_positions_and_signs():
    x = torch.tensor([[[1.0, -5.0, 0.0], [3.0, 2.0, -0.5]], [[-4.0, 1.0, 0.25], [0.0, 0.0, 0.0]]])
    m = channel_maxima(x)
    assert m.abs_max.tolist() == [4.0, 5.0, 0.5]
    assert m.value.tolist() == [-4.0, -5.0, -0.5]
    assert m.token.tolist() == [0, 0, 1]
    assert m.batch.tolist() == [1, 0, 0]
    assert m.abs_max.dtype == torch.float32


def test_attention_mask_excludes_padding():
    x = torch.tensor([[[1.0], [9.0]], [[2.0], [-3.0]]])
    mask = torch.tensor([[1, 0], [1, 1]])
    m = channel_maxima(x, mask.bool())
    assert m.abs_max.tolist() == [3.0] and m.batch.tolist() == [1] and m.token.tolist() == [1]


def test_recorder_uses_attention_mask_passed_to_model(planted):
    ids = torch.tensor([[10, 11, 12, 1], [10, 11, 12, 13]])  # trigger 1 only at a padded spot
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    name = planted.causal[0].module
    with record(planted.model) as rec, torch.no_grad():
        planted.model(ids, attention_mask=mask)
    assert float(rec.stats[name].input.abs_max[17]) < 1.0
    with record(planted.model) as rec, torch.no_grad():
        planted.model(ids)
    assert float(rec.stats[name].input.abs_max[17]) > 100.0


def test_bf16_and_fp16_stats_are_float32_and_finite():
    for dtype in (torch.bfloat16, torch.float16):
        planted = plant_super_weight(tiny_model("llama", dtype=dtype), 1, 5, 17, trigger_token=1)
        with record(planted.model) as rec, torch.no_grad():
            planted.model(planted.prompt())
        s = rec.stats[planted.planted[0].module]
        assert s.output.abs_max.dtype == torch.float32
        assert torch.isfinite(s.output.abs_max).all()
        assert s.output.top()[0] == 5


def test_running_max_over_batches_and_calls(planted):
    name = planted.causal[0].module
    with record(planted.model) as rec, torch.no_grad():
        planted.model(torch.tensor([[20, 21, 22]]))
        quiet = float(rec.stats[name].output.abs_max[5])
        planted.model(torch.tensor([[20, 21, 22], [20, 1, 22]]))
    s = rec.stats[name]
    assert s.calls == 2
    assert float(s.output.abs_max[5]) > 100 * quiet
    assert int(s.output.batch[5]) == 1 and int(s.output.token[5]) == 1


def test_memory_does_not_grow_with_sequence_length(planted):
    sizes = []
    for length in (8, 128):
        with record(planted.model) as rec, torch.no_grad():
            planted.model(torch.randint(20, 256, (2, length)))
        sizes.append(sum(t.numel() for t in rec.state_dict().values()))
    assert sizes[0] == sizes[1]


def test_state_dict_round_trip_and_merge(planted):
    with record(planted.model) as a, torch.no_grad():
        planted.model(torch.tensor([[20, 1, 21]]))
    with record(planted.model) as b, torch.no_grad():
        planted.model(torch.tensor([[20, 21, 22, 23, 3]]))
    restored = stats_from_state_dict(a.state_dict())
    name = planted.causal[0].module
    assert torch.equal(restored[name].output.abs_max, a.stats[name].output.abs_max)
    a.merge(b)
    decoy = planted.decoys[0]
    assert a.stats[decoy.module].output.top()[0] == decoy.row
    assert int(a.stats[decoy.module].output.token[decoy.row]) == 4
    assert a.stats[name].calls == 2
    a.reset()
    assert a.stats == {}


def test_merge_is_elementwise_max():
    def m(values):
        return channel_maxima(torch.tensor([[values]]))

    merged = merge_channel_maxima(m([1.0, -7.0]), m([-3.0, 2.0]))
    assert merged.value.tolist() == [-3.0, -7.0]


def test_hooks_removed_even_when_forward_raises(planted):
    model = planted.model
    before = sum(len(mod._forward_hooks) + len(mod._forward_pre_hooks) for mod in model.modules())
    with pytest.raises(IndexError):
        with record(model):
            model(torch.tensor([[100_000]]))
    after = sum(len(mod._forward_hooks) + len(mod._forward_pre_hooks) for mod in model.modules())
    assert before == after == 0


def test_nested_recorders_each_see_every_call(planted):
    with record(planted.model) as outer, torch.no_grad():
        with record(planted.model, [planted.causal[0].module]) as inner:
            planted.model(planted.prompt())
        planted.model(planted.prompt())
    assert inner.stats[planted.causal[0].module].calls == 1
    assert outer.stats[planted.causal[0].module].calls == 2
    assert list(inner.stats) == [planted.causal[0].module]


def test_no_reference_to_model_survives():
    planted = planted_llama()
    model = planted.model
    rec = record(model)
    with torch.no_grad():
        model(planted.prompt())
    rec.remove()
    ref = weakref.ref(model)
    del model, planted
    gc.collect()
    assert ref() is None
    assert isinstance(next(iter(rec.stats.values())), ChannelStats)


def test_works_with_autograd_and_inference_mode(planted):
    model = planted.model
    ids = planted.calibration_ids(32)
    with record(model) as rec:
        loss = model(ids, labels=ids).loss
        loss.backward()
    assert model.model.layers[1].mlp.down_proj.weight.grad is not None
    assert rec.stats[planted.causal[0].module].calls == 1
    with torch.inference_mode(), record(model) as rec:
        model(ids)
    assert rec.stats[planted.causal[0].module].input.top()[0] == 17


def test_bad_input_is_named():
    with pytest.raises(TypeError, match="nn.Module"):
        record([1, 2, 3])
    with pytest.raises(ValueError, match="no MLP down-projection"):
        record(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="nothing to record"):
        record(tiny_model("llama", num_layers=1), inputs=False, outputs=False)
    with torch.device("meta"):
        meta = nn.ModuleDict(
            {
                "layers": nn.ModuleList(
                    [nn.ModuleDict({"mlp": nn.ModuleDict({"down_proj": nn.Linear(4, 4)})})]
                )
            }
        )
    with pytest.raises(ValueError, match="meta device"):
        record(meta)


def test_without_locations_same_maxima_and_signs_cheaper_path(planted):
    ids = planted.calibration_ids(64)
    with (
        torch.no_grad(),
        record(planted.model) as full,
        record(planted.model, locations=False) as light,
    ):
        planted.model(ids)
        planted.model(ids[:, :32])
    for name, stats in full.stats.items():
        for side in ("input", "output"):
            a, b = getattr(stats, side), getattr(light.stats[name], side)
            assert torch.equal(a.abs_max, b.abs_max) and torch.equal(a.value, b.value)
            assert (b.token == -1).all() and (b.batch == -1).all()


def test_located_channels_are_the_largest_and_exact():
    x = torch.randn(2, 40, 64)
    x[1, 7, 12] = -50.0  # a negative spike: its value and place must come out exactly
    full = channel_maxima(x, locations=True)
    some = channel_maxima(x, locations=5)
    assert torch.equal(some.abs_max, full.abs_max) and torch.equal(some.value, full.value)
    located = (some.token >= 0).nonzero().flatten()
    assert set(located.tolist()) == set(full.abs_max.topk(5).indices.tolist())
    assert torch.equal(some.token[located], full.token[located])
    assert torch.equal(some.batch[located], full.batch[located])
    assert (int(some.token[12]), int(some.batch[12]), float(some.value[12])) == (7, 1, -50.0)
    assert bool((some.batch[some.token < 0] == -1).all())


def test_recorder_keeps_exact_locations_of_the_largest_channels_over_calls(planted):
    calls = [planted.calibration_ids(length=24, seed=seed) for seed in range(3)]
    recorded = {}
    for locations in (True, 4):
        with record(planted.model, locations=locations) as rec, torch.no_grad():
            for ids in calls:
                planted.model(ids)
        recorded[locations] = rec.stats
    for name, full in recorded[True].items():
        some = recorded[4][name].output
        assert torch.equal(some.abs_max, full.output.abs_max)
        kept = some.token >= 0
        assert int(kept.sum()) >= 4  # the last call's four largest at least
        assert torch.equal(some.token[kept], full.output.token[kept])
    spike = recorded[4]["model.layers.1.mlp.down_proj"].output
    assert int(spike.token[5]) >= 0  # the super activation's row is always located


@pytest.mark.parametrize("bad", [-1, 2.5, "all"])
def test_bad_locations_are_refused_before_hooking(planted, bad):
    with pytest.raises(ValueError, match="locations must be"):
        record(planted.model, locations=bad)
    assert all(not m._forward_hooks for m in planted.model.modules())
