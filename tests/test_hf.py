"""The Hugging Face Trainer callback and the watch() context manager on tiny planted models."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer, TrainingArguments

from sw_hooks.testing import planted_llama
from sw_hooks.testing.datasets import Sequences
from sw_hooks.training.hf import SuperWeightCallback, watch

SUPER = ("model.layers.1.mlp.down_proj", 5, 17)


def train(tmp_path, callback: SuperWeightCallback, weight_decay: float = 0.0, lr: float = 1e-2):
    model = planted_llama().model.train()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=lr,
        weight_decay=weight_decay,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=Sequences.planted(6), callbacks=[callback]
    )
    before = model.model.layers[1].mlp.down_proj.weight.detach().clone()
    trainer.train()
    return trainer, before, model.model.layers[1].mlp.down_proj.weight.detach()


@pytest.mark.parametrize(("mode", "weight_decay"), [("restore", 0.01), ("freeze", 0.0)])
def test_trainer_callback_monitors_and_guards(tmp_path, mode, weight_decay) -> None:
    callback = SuperWeightCallback([SUPER], every_n_steps=1, guard=mode)
    trainer, before, after = train(tmp_path, callback, weight_decay)
    assert torch.equal(after[5, 17], before[5, 17])
    assert (after != before).float().mean() > 0.5
    kinds = [(e.kind, e.module, e.row, e.col) for e in callback.events]
    assert kinds == [("found", "model.layers.3.mlp.down_proj", 9, 33)]  # SUPER was given
    logged = [h for h in trainer.state.log_history if "sw/train/layer_1/output_max" in h]
    assert [h["step"] for h in logged] == [0, 1, 2]
    assert logged[-1]["sw/train/layer_1.row_5.col_17/value"] == 8.0


def test_trainer_callback_without_guard_lets_weight_move(tmp_path) -> None:
    callback = SuperWeightCallback(every_n_steps=2)
    trainer, before, after = train(tmp_path, callback)
    assert after[5, 17] != before[5, 17]
    assert [h["step"] for h in trainer.state.log_history if "sw/events/found" in h] == [0, 2]
    assert {e.row for e in callback.events} == {5, 9}


def test_watch_around_generate(planted) -> None:
    with watch(planted.model) as seen:
        planted.model.generate(planted.prompt()[:, :3], max_new_tokens=4, do_sample=False)
    assert [(e.kind, e.row, e.col) for e in seen.events] == [("found", 5, 17), ("found", 9, 33)]
    assert seen.values["sw/watch/layer_1.row_5.col_17/value"] == 8.0
    assert seen.recorder.stats == {}  # hooks removed, recording folded into the tracker


def test_callback_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="guard must be None or one of"):
        SuperWeightCallback(guard="lock")
    with pytest.raises(ValueError, match="every_n_steps must be a positive integer"):
        SuperWeightCallback(every_n_steps=0)


def test_trainer_callback_verifies_candidates_and_guards_the_super_weight(tmp_path) -> None:
    # No weights given: the callback finds both spike pairs and measures them on the first
    # training batch (lr 1e-3: a 64-wide model keeps its planted weight after one step).
    callback = SuperWeightCallback(every_n_steps=1, guard="restore")
    trainer, before, after = train(tmp_path, callback, weight_decay=0.01, lr=1e-3)
    assert callback.session.verifier.batch_source == "first recorded batch"
    found = [(e.kind, e.module, e.row, e.col, e.verdict) for e in callback.events]
    assert found == [
        ("found", *SUPER, "super"),
        ("found", "model.layers.3.mlp.down_proj", 9, 33, "candidate"),
    ]
    planted, decoy = callback.candidates
    assert planted.impact > 2.0 and decoy.impact == pytest.approx(1.0, abs=0.1)
    assert callback.guard.coordinates == [SUPER]
    assert float(after[5, 17]) == planted.value  # guarded from step 1, at its value then
    logged = [h for h in trainer.state.log_history if "sw/train/candidates" in h]
    assert [(h["sw/train/candidates"], h["sw/train/super_weights"]) for h in logged] == [
        (2.0, 1.0)
    ] * 3


def test_watch_measures_on_a_calibration_batch(planted) -> None:
    with watch(planted.model, calibration=planted.calibration_ids(64)) as seen:
        planted.model.generate(planted.prompt()[:, :3], max_new_tokens=4, do_sample=False)
    assert [(e.row, e.verdict) for e in seen.events] == [(5, "super"), (9, "candidate")]
    assert seen.values["sw/watch/super_weights"] == 1.0
    assert seen.values["sw/watch/layer_1.row_5.col_17/impact"] > 2.0
