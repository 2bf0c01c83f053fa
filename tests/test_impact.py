import math

import pytest
import torch
import torch.nn.functional as F

from sw_hooks.analysis.impact import compare_masked, impact, perplexity, table1, windows
from sw_hooks.core.masks import ablate
from sw_hooks.core.results import SuperWeight


def _reference_perplexity(model, ids):
    with torch.no_grad():
        logits = model(ids).logits[0, :-1]
    return math.exp(F.cross_entropy(logits, ids[0, 1:]).item())


def test_single_window_matches_plain_cross_entropy(planted):
    ids = planted.calibration_ids(64)
    assert perplexity(planted.model, ids, window=64, stride=64) == pytest.approx(
        _reference_perplexity(planted.model, ids), rel=1e-5
    )


def test_windows_score_every_token_once():
    spans = list(windows(10, 4, 2))
    scored = [i for begin, end, first in spans for i in range(begin + first, end)]
    assert scored == list(range(1, 10))


def _super(planted):
    p = planted.causal[0]
    return SuperWeight(p.module, p.layer, p.row, p.col, p.value)


def test_compare_measures_the_ablation(planted):
    ids = planted.calibration_ids()
    weight = _super(planted)
    result = compare_masked(
        planted.model, ids, lambda: ablate(planted.model, [weight]), stopword_ids=[2, 3]
    )
    assert result.ratio > 2.0
    assert result.kl_divergence > 0.1
    assert result.top1_agreement < 0.9
    same = impact(planted.model, ids, [])
    assert same.ratio == pytest.approx(1.0) and same.kl_divergence == pytest.approx(0.0, abs=1e-6)
    assert same.top1_agreement == 1.0


def _trigger_first_ids(planted, rows=4, length=8):
    """Random filler rows that each open with the causal trigger and its target."""
    p = planted.causal[0]
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(16, 256, (rows, length), generator=generator)
    ids[:, 0], ids[:, 1] = p.trigger_token, p.target_token
    return ids


def test_table1_rows(planted):
    ids = _trigger_first_ids(planted)
    weight = planted.recorded_super_weight(ids)
    assert weight.token_position == 0 and weight.output_activation > 100.0
    rows = table1(planted.model, ids, [weight], outliers_per_matrix=1)
    names = [r.condition for r in rows]
    assert names == [
        "original",
        "super weights pruned",
        "non-super outliers pruned",
        "super weights pruned, super activation restored",
    ]
    by = {r.condition: r for r in rows}
    assert by["original"].ratio == pytest.approx(1.0)
    assert by["super weights pruned"].ratio > 2.0
    assert by["non-super outliers pruned"].weights_changed == 4 * 7  # one per decoder matrix
    restored = by["super weights pruned, super activation restored"]
    assert restored.perplexity == pytest.approx(by["original"].perplexity, rel=0.01)
    assert restored.weights_changed == 1


def test_bad_ids():
    from sw_hooks.testing import tiny_model

    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(tiny_model("llama", num_layers=1), torch.tensor([[1]]))
    with pytest.raises(TypeError, match="integer tensor"):
        perplexity(tiny_model("llama", num_layers=1), torch.tensor([[1.0, 2.0]]))


def test_compare_is_the_deprecated_name_of_compare_masked(planted):
    import sw_hooks

    ids = planted.calibration_ids()[:, :16]
    weight = _super(planted)
    with pytest.warns(DeprecationWarning, match="renamed compare_masked"):
        old = sw_hooks.compare(planted.model, ids, lambda: ablate(planted.model, [weight]))
    assert old == compare_masked(planted.model, ids, lambda: ablate(planted.model, [weight]))
