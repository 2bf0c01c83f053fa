"""ChannelMax against the recorder (the reference), and its cross-rank reduction functions."""

from __future__ import annotations

import pytest
import torch

from sw_hooks.metrics import ChannelMax, keep_largest, maxima_to_where, merge_where
from sw_hooks.record import channel_maxima, record


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
