"""Super-weight holdout on the real SmolLM2-135M: measured, not assumed."""

from __future__ import annotations

import pytest
import torch

from sw_hooks.analysis.impact import perplexity
from sw_hooks.models import calibration_text, tokenize
from sw_hooks.quant.config import QuantConfig
from sw_hooks.quant.quantize import quantize_model

SUPER_WEIGHT = ("model.layers.11.mlp.down_proj", 507, 1229)


@pytest.mark.slow
def test_with_clipping_holding_out_the_super_weight_lowers_perplexity(smollm2) -> None:
    model, tokenizer = smollm2
    ids = tokenize(tokenizer, calibration_text(), max_tokens=256)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        baseline = perplexity(model, ids, window=256, stride=256)
        measured = {}
        for held in (False, True):
            holdout = [SUPER_WEIGHT] if held else None
            with quantize_model(model, QuantConfig(4, 4096, clip="zscore:6"), holdout=holdout):
                measured[held] = perplexity(model, ids, window=256, stride=256)
                down = model.get_submodule(SUPER_WEIGHT[0]).weight
                kept = torch.equal(down[507, 1229], before[f"{SUPER_WEIGHT[0]}.weight"][507, 1229])
                assert kept == held  # z = 6 clips the super weight unless it is held out
    # the clip destroys the super weight; holding it out keeps perplexity clearly lower
    assert baseline < measured[True] < measured[False] / 1.3
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
