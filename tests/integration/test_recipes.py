"""Run each integration recipe on a copy of the real SmolLM2-135M (a few 64-token steps)."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[2] / "integrations"))

ROW, COL = 507, 1229
SUPER = "model.layers.11.mlp.down_proj"


@pytest.fixture
def fresh(smollm2):
    model, tokenizer = smollm2
    return copy.deepcopy(model), tokenizer


def assert_guarded(before: torch.Tensor, after: torch.Tensor) -> None:
    assert torch.equal(after[ROW, COL], before[ROW, COL])  # bit-identical
    assert (after != before).float().mean() > 0.9  # while the layer trained


@pytest.mark.slow
def test_lightning_recipe(fresh, tmp_path) -> None:
    import lightning_finetune

    result = lightning_finetune.main(*fresh, steps=2, out=str(tmp_path))
    assert_guarded(result["before"], result["after"])
    found = {(e.module, e.row, e.col) for e in result["monitor"].events if e.kind == "found"}
    assert ("net." + SUPER, ROW, COL) in found
    (csv,) = tmp_path.glob("finetune/version_*/metrics.csv")
    assert "sw/train/layer_11.row_507.col_1229/activation" in csv.read_text().splitlines()[0]


@pytest.mark.slow
def test_hf_recipe(fresh, tmp_path) -> None:
    import hf_finetune

    result = hf_finetune.main(*fresh, steps=2, out=str(tmp_path))
    assert_guarded(result["before"], result["after"])
    logged = [h for h in result["trainer"].state.log_history if "sw/events/found" in h]
    assert logged[0]["sw/train/layer_11.row_507.col_1229/activation"] > 1000


@pytest.mark.slow
def test_ablation_recipe(fresh) -> None:
    model, tokenizer = fresh
    before = model.get_submodule(SUPER).weight.detach().clone()
    import ablation_eval

    result = ablation_eval.main(model, tokenizer, batches=2)
    assert result["val_loss_ablated"] > result["val_loss"] + 1.0  # the paper's collapse
    assert torch.equal(model.get_submodule(SUPER).weight, before)


@pytest.mark.slow
def test_plain_loop_recipe(fresh) -> None:
    import plain_loop

    result = plain_loop.main(*fresh, steps=2)
    assert_guarded(result["before"], result["after"])
    assert result["watch"].values["sw/train/layer_11.row_507.col_1229/activation"] > 1000


@pytest.mark.slow
def test_finetune_story_recipe_verifies_one_super_weight(fresh, tmp_path) -> None:
    import finetune_story

    summary = finetune_story.main(
        "guarded",
        steps=2,
        every=1,
        val_every=1,
        out=str(tmp_path),
        model=fresh[0],
        tokenizer=fresh[1],
    )
    verdicts = {(w["module"], w["row"], w["col"]): w["verdict"] for w in summary["candidates"]}
    assert [k for k, v in verdicts.items() if v == "super"] == [("net." + SUPER, ROW, COL)]
    assert len(verdicts) >= 2  # the other spike pairs, measured and left as candidates
    assert all(w["impact"] is not None for w in summary["candidates"])
    assert summary["guarded"] == [["net." + SUPER, ROW, COL]]
    assert summary["held_out_batch"] == "calibration"
    assert summary["held_out_batch_shape"] == [1, 512]
    assert (tmp_path / "guarded" / "history.png").stat().st_size > 0
