"""The real model's impact, measured by detection with its speed-ups, against the plain method."""

import pytest

from sw_hooks import calibration_text, tokenize
from sw_hooks.analysis.detect import run_detection
from sw_hooks.analysis.impact import perplexity
from sw_hooks.core.masks import ablate

pytestmark = pytest.mark.slow

SUPER = ("model.layers.11.mlp.down_proj", 507, 1229)


def test_detected_impact_is_the_plain_perplexity_ratio_over_several_windows(smollm2):
    """1024 tokens: three windows of 512 with stride 256, so prefix reuse and screening both
    act (the six late candidates are screened after the first window)."""
    model, tokenizer = smollm2
    ids = tokenize(tokenizer, calibration_text(), max_tokens=1024)
    result = run_detection(model, ids[:, :128], calibration=ids)
    found = {w.coordinate: w for w in result.candidates}[SUPER]
    base = perplexity(model, ids, window=512, stride=256)
    with ablate(model, [SUPER]):
        zeroed = perplexity(model, ids, window=512, stride=256)
    assert found.impact == pytest.approx(zeroed / base, rel=1e-5, abs=0)
    assert result.baseline_perplexity == pytest.approx(base, rel=1e-5, abs=0)
    assert any(w.impact is not None and w.impact < 1.19 for w in result.candidates)
