"""ChannelMax against the recorder (the reference), and its cross-rank reduction functions."""

from __future__ import annotations

from dataclasses import astuple

import pytest
import torch

from sw_hooks.core.record import (
    ChannelMaxima,
    ChannelStats,
    channel_maxima,
    merge_channel_maxima,
    record,
)
from sw_hooks.training.metrics import ChannelMax, keep_largest, maxima_to_where, merge_where


def test_matches_recorder_over_several_updates(planted) -> None:
    metric = ChannelMax.for_model(planted.model)
    with record(planted.model) as reference, torch.no_grad():
        for seed in range(3):
            with record(planted.model) as one:
                planted.model(planted.calibration_ids(24, seed))
            metric.update(one)
    computed = metric.compute_stats()
    for name, expected in reference.stats.items():
        assert computed[name].calls == expected.calls == 3
        for side in ("input", "output"):
            got, want = getattr(computed[name], side), getattr(expected, side)
            for field in ("abs_max", "value", "token", "batch"):
                assert torch.equal(getattr(got, field), getattr(want, field)), (name, side, field)
    metric.reset()
    assert metric.compute_stats() == {}


def test_keep_largest_picks_each_channels_winner_lowest_rank_on_ties() -> None:
    rank0 = maxima_to_where(channel_maxima(torch.tensor([[[4.0, -1.0, 2.0]]])))
    rank1 = maxima_to_where(channel_maxima(torch.tensor([[[0.0, 1.0, 1.0], [-3.0, -3.0, 3.0]]])))
    reduced = keep_largest(torch.stack([rank0, rank1]))
    assert reduced[0].tolist() == [4.0, 3.0, 3.0]
    assert reduced[1].tolist() == [4.0, -3.0, 3.0]
    assert reduced[2].tolist() == [0.0, 1.0, 1.0]  # token of the winner
    tie = keep_largest(torch.stack([rank0, rank0 * torch.tensor([[1.0], [-1.0], [1.0], [1.0]])]))
    assert torch.equal(tie, rank0)
    assert torch.equal(merge_where(rank0, rank1), reduced)


def test_unknown_module_is_refused(planted) -> None:
    metric = ChannelMax({"a": (2, 3)})
    with record(planted.model) as rec, torch.no_grad():
        planted.model(planted.prompt())
    with pytest.raises(ValueError, match="does not track module 'model.layers.0.mlp.down_proj'"):
        metric.update(rec)
    with pytest.raises(ValueError, match="at least one module"):
        ChannelMax({})


def test_states_reduce_with_max() -> None:
    metric = ChannelMax({"m": (2, 3)})
    assert metric._reductions["input_abs_max_0"].__name__ == "dim_zero_max"
    assert metric._reductions["calls_0"].__name__ == "dim_zero_sum"
    assert metric._reductions["output_where_0"] is keep_largest


def on_meta(stats: dict[str, ChannelStats]) -> dict[str, ChannelStats]:
    """The same stats with every tensor on the meta device: a device the states are not on."""

    def move(maxima: ChannelMaxima | None) -> ChannelMaxima | None:
        if maxima is None:
            return None
        return ChannelMaxima(*(t.to("meta") for t in astuple(maxima)))

    return {n: ChannelStats(move(s.input), move(s.output), s.calls) for n, s in stats.items()}


def test_states_move_to_the_device_of_the_first_update(planted) -> None:
    metric = ChannelMax.for_model(planted.model)
    assert metric.device.type == "cpu"
    with record(planted.model) as rec, torch.no_grad():
        planted.model(planted.prompt())
    metric.update(on_meta(rec.stats))
    assert metric.device.type == "meta"
    assert {state.device.type for state in metric.metric_state.values()} == {"meta"}
    metric.reset()  # the defaults moved too: a reset stays where the data is
    assert {state.device.type for state in metric.metric_state.values()} == {"meta"}


def test_side_never_recorded_is_none_also_after_merging_ranks(planted) -> None:
    name = "model.layers.1.mlp.down_proj"
    recordings, metrics = [], []
    for seed in range(2):
        with record(planted.model, inputs=False) as rec, torch.no_grad():
            planted.model(planted.calibration_ids(24, seed))
        metric = ChannelMax.for_model(planted.model)
        metric.update(rec)
        recordings.append(rec.stats[name])
        metrics.append(metric)
    alone = metrics[1].compute_stats()[name]
    assert alone.input is None and alone.output.top()[0] == 5
    metrics[0].merge_state(metrics[1])  # the keep_largest / max reductions a DDP sync applies
    metrics[0].merge_state(ChannelMax.for_model(planted.model))  # a rank that saw nothing
    merged = metrics[0].compute_stats()[name]
    assert merged.input is None and merged.calls == 2
    expected = merge_channel_maxima(recordings[0].output, recordings[1].output)
    for got, want in zip(astuple(merged.output), astuple(expected), strict=True):
        assert torch.equal(got, want)


def test_all_nan_side_is_kept_not_taken_for_unrecorded() -> None:
    nan = torch.full((1, 1, 2), float("nan"))
    metric = ChannelMax({"m": (2, 2)})
    metric.update({"m": ChannelStats(channel_maxima(nan), channel_maxima(torch.ones(1, 1, 2)), 1)})
    stats = metric.compute_stats()["m"]
    assert stats.input is not None and bool(stats.input.abs_max.isnan().all())
    assert stats.output.abs_max.tolist() == [1.0, 1.0]
