"""Screening never changes a verdict silently: a guard measures the screened together.

The planted Llama here has its super weight's trigger only after token 512, so the first
window (the default 512 tokens) shows nothing of it: screening stops measuring it there,
and only the guard (every screened candidate removed together, over the whole text) can
bring it back.
"""

from __future__ import annotations

import pytest
import torch

from sw_hooks.analysis.detect import run_detection
from sw_hooks.analysis.impact import perplexity
from sw_hooks.analysis.streamed import run_streamed_detection
from sw_hooks.analysis.super_experts import detect_super_experts
from sw_hooks.core.masks import ablate
from sw_hooks.core.streaming import in_memory
from sw_hooks.testing import PlantedModel, planted_llama, planted_moe


def _late_trigger_ids(planted: PlantedModel, length: int = 1536, quiet: int = 512):
    """Calibration ids with the causal weights' triggers and targets absent before ``quiet``."""
    ids = planted.calibration_ids(length)
    early = ids[0, :quiet]
    hit = torch.zeros_like(early, dtype=torch.bool)
    for weight in planted.causal:
        hit |= (early == weight.trigger_token) | (early == weight.target_token)
    filler = torch.randint(16, 256, (int(hit.sum()),), generator=torch.Generator().manual_seed(1))
    early[hit] = filler
    return ids


def test_a_super_weight_whose_effect_shows_after_the_first_window_keeps_its_verdict():
    planted = planted_llama()
    ids = _late_trigger_ids(planted)
    assert not (ids[0, :512] == planted.causal[0].trigger_token).any()
    lines: list[str] = []
    result = run_detection(planted.model, planted.prompt(), calibration=ids, progress=lines.append)
    weight = planted.causal[0]
    found = {(w.layer, w.row, w.col): w for w in result.candidates}[(1, 5, 17)]
    base = perplexity(planted.model, ids)
    with ablate(planted.model, [(weight.module, weight.row, weight.col)]):
        plain = perplexity(planted.model, ids) / base
    assert plain > 2.0
    assert found.verdict == "super"
    assert found.impact == pytest.approx(plain, rel=1e-5, abs=0)
    assert any("screened candidate(s) removed together" in line for line in lines)


def test_super_experts_follow_the_same_rule_in_detection_and_on_their_own():
    """Both planted effects show only after token 512: both entry points screen, guard and
    measure again, to the same numbers."""
    planted = planted_moe("mixtral")
    ids = _late_trigger_ids(planted)
    result = run_detection(planted.model, planted.prompt(), calibration=ids, expert_percentile=90.0)
    alone = detect_super_experts(planted.model, planted.prompt(), calibration=ids, percentile=90.0)
    assert [(e.layer, e.expert, e.verdict) for e in result.super_experts] == [
        (1, 3, "super"),
        (2, 6, "super"),
    ]
    assert [e.impact for e in result.super_experts] == [e.impact for e in alone]


def test_block_by_block_detection_guards_its_screening_too():
    planted = planted_llama()
    ids = _late_trigger_ids(planted)
    reference = run_detection(planted.model, planted.prompt(), calibration=ids)
    run = run_streamed_detection(in_memory(planted.model), planted.prompt(), calibration=ids)
    found = {(w.layer, w.row, w.col): w for w in run.result.candidates}[(1, 5, 17)]
    expected = {(w.layer, w.row, w.col): w for w in reference.candidates}[(1, 5, 17)]
    assert found.verdict == expected.verdict == "super"
    assert found.impact == pytest.approx(expected.impact, rel=1e-5)
