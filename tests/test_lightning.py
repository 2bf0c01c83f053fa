"""Lightning callbacks on tiny planted models: logged values, verdicts, guard, ablation, resume."""

from __future__ import annotations

import copy
import csv
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader

from sw_hooks.core.record import record
from sw_hooks.testing import plant_super_weight, planted_llama, tiny_model
from sw_hooks.training.guard import WeightGuard
from sw_hooks.training.lightning import SuperWeightAblation, SuperWeightGuard, SuperWeightMonitor
from sw_hooks.training.monitor import SpikeTracker, metric_values, qualify, watch

SUPER = ("net.model.layers.1.mlp.down_proj", 5, 17)
DECOY = ("net.model.layers.3.mlp.down_proj", 9, 33)


class CausalLM(pl.LightningModule):
    """A plain LightningModule around a Hugging Face causal LM; ``before_step`` lets a test
    change the model mid-training (a collapse, a new super weight)."""

    def __init__(
        self,
        net: torch.nn.Module,
        *,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        before_step: Callable[[CausalLM, int], None] | None = None,
    ) -> None:
        super().__init__()
        self.net, self.lr, self.weight_decay, self.before_step = net, lr, weight_decay, before_step

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        if self.before_step is not None:
            self.before_step(self, self.global_step)
        loss = self.net(input_ids=batch, labels=batch).loss
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("val_loss", self.net(input_ids=batch, labels=batch).loss)

    def test_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("test_loss", self.net(input_ids=batch, labels=batch).loss)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


def batches(count: int = 8, length: int = 32) -> DataLoader:
    """Planted-model text: every sequence holds both triggers, so every batch shows both spikes."""
    planted = planted_llama()
    ids = torch.cat([planted.calibration_ids(length, seed=i) for i in range(count)])
    return DataLoader(ids, batch_size=2)


def trainer(tmp_path: Path, callbacks: list[Callback], **kwargs) -> pl.Trainer:
    options = dict(
        accelerator="cpu",
        devices=1,
        max_steps=4,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=CSVLogger(tmp_path, name="run"),
    )
    return pl.Trainer(callbacks=callbacks, **{**options, **kwargs})


def logged_rows(tmp_path: Path) -> list[dict[str, str]]:
    (path,) = tmp_path.glob("run/version_*/metrics.csv")
    with path.open() as handle:
        return list(csv.DictReader(handle))


def weight(module: pl.LightningModule, coordinate: tuple[str, int, int]) -> torch.Tensor:
    name, row, col = coordinate
    return module.get_submodule(name).weight[row, col].detach().clone()


# -- core, no framework ------------------------------------------------------------------
def test_tracker_flags_collapse_and_drift_then_recovery(planted) -> None:
    tracker = SpikeTracker(collapse_factor=4.0, drift_fraction=0.5)
    prompt, coordinate = planted.prompt(), ("model.layers.1.mlp.down_proj", 5, 17)
    kinds = []
    for step, value in enumerate((8.0, 1.0, 8.0)):
        planted.model.model.layers[1].mlp.down_proj.weight.data[5, 17] = value
        with record(planted.model) as rec, torch.no_grad():
            planted.model(prompt)
        kinds.append([e.kind for e in tracker.update(planted.model, rec.stats, step=step)])
    assert kinds == [["found", "found"], ["collapsed", "drifted"], ["recovered"]]
    assert tracker.status(coordinate) == set()
    assert [e.step for e in tracker.events] == [0, 0, 1, 1, 2]


def test_tracker_state_round_trips(planted) -> None:
    with watch(planted.model) as seen, torch.no_grad():
        planted.model(planted.prompt())
    restored = SpikeTracker()
    restored.load_state_dict(seen.tracker.state_dict())
    assert restored.state_dict() == seen.tracker.state_dict()
    assert [w.coordinate for w in restored.candidates] == [
        ("model.layers.1.mlp.down_proj", 5, 17),
        ("model.layers.3.mlp.down_proj", 9, 33),
    ]
    assert [w.coordinate for w in restored.super_weights] == [
        ("model.layers.1.mlp.down_proj", 5, 17)
    ]


def test_metric_values_names_are_stable(planted) -> None:
    with watch(planted.model, stage="train") as seen, torch.no_grad():
        planted.model(planted.prompt())
    values = seen.values
    assert seen.tracker.current(planted.model, {}) == {}  # nothing recorded, nothing to say
    assert values["sw/train/layer_1.row_5.col_17/value"] == 8.0
    assert (
        values["sw/train/layer_1.row_5.col_17/activation"] == values["sw/train/layer_1/output_max"]
    )
    assert values["sw/train/candidates"] == 2.0 and values["sw/train/super_weights"] == 1.0
    assert values["sw/train/layer_1.row_5.col_17/impact"] > 2.0
    assert values["sw/train/layer_3.row_9.col_33/impact"] < 1.1
    assert values["sw/events/found"] == 2.0 and values["sw/events/collapsed"] == 0.0
    assert values["sw/event/found/layer_3.row_9.col_33"] == 1.0
    assert metric_values({}, SpikeTracker(), {}, stage="val")["sw/val/super_weights"] == 0.0


def test_qualify_matches_by_suffix_and_refuses_ambiguity(planted) -> None:
    wrapper = torch.nn.ModuleDict({"net": planted.model})
    (named,) = qualify(wrapper, [("model.layers.1.mlp.down_proj", 5, 17)])
    assert named.module == "net.model.layers.1.mlp.down_proj" and named.layer == 1
    with pytest.raises(ValueError, match="ending in '.mlp.down_proj'"):
        qualify(wrapper, [("mlp.down_proj", 0, 0)])


@pytest.mark.parametrize(("mode", "weight_decay"), [("restore", 0.01), ("freeze", 0.0)])
def test_guard_keeps_weight_bit_identical_under_adamw(planted, mode, weight_decay) -> None:
    model = planted.model.train()
    guarded = ("model.layers.1.mlp.down_proj", 5, 17)
    before = model.model.layers[1].mlp.down_proj.weight.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=weight_decay)
    with WeightGuard(model, [guarded], mode).attach(optimizer):
        for seed in range(3):
            optimizer.zero_grad()
            model(
                planted.calibration_ids(32, seed), labels=planted.calibration_ids(32, seed)
            ).loss.backward()
            optimizer.step()
    after = model.model.layers[1].mlp.down_proj.weight.detach()
    assert torch.equal(after[5, 17], before[5, 17])  # bit-identical
    assert after[5, 16] != before[5, 16] and after[4, 17] != before[4, 17]  # neighbours moved


def test_unguarded_weight_moves_and_freeze_refuses_weight_decay(planted) -> None:
    model = planted.model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)  # default weight_decay=0.01
    model(planted.prompt(), labels=planted.prompt()).loss.backward()
    optimizer.step()
    assert float(model.model.layers[1].mlp.down_proj.weight[5, 17]) != 8.0
    with pytest.raises(ValueError, match="weight_decay=0.01 in parameter group 0"):
        WeightGuard(model, [("model.layers.1.mlp.down_proj", 5, 17)], "freeze").attach(optimizer)


# -- monitor -----------------------------------------------------------------------------
def test_monitor_logs_values_and_flags_planted_weight(tmp_path) -> None:
    monitor = SuperWeightMonitor(every_n_steps=2)
    module = CausalLM(planted_llama().model)
    trainer(tmp_path, [monitor]).fit(module, batches(), batches(4))
    assert [(e.kind, e.step, e.module, e.row, e.col) for e in monitor.events] == [
        ("found", 0, *SUPER),
        ("found", 0, *DECOY),
    ]
    rows = logged_rows(tmp_path)
    steps = [r["step"] for r in rows if r.get("sw/train/layer_1/output_max")]
    assert steps == ["0", "2"]  # every 2nd of 4 steps
    first = next(r for r in rows if r.get("sw/train/layer_1/output_max"))
    # read after step 0's AdamW update, whose first step moves every weight by lr
    assert float(first["sw/train/layer_1.row_5.col_17/value"]) == pytest.approx(
        8.0 - 1e-3, abs=1e-6
    )
    assert float(first["sw/train/layer_1/output_max"]) > 100 * float(
        first["sw/train/layer_0/output_max"]
    )
    assert float(first["sw/event/found/layer_1.row_5.col_17"]) == 1.0
    assert any(r.get("sw/val/layer_1.row_5.col_17/activation") for r in rows)


def test_monitor_flags_collapse_during_training(tmp_path) -> None:
    def collapse(module: CausalLM, step: int) -> None:
        if step == 2:
            module.net.model.layers[1].mlp.down_proj.weight.data[5, 17] = 0.0

    monitor = SuperWeightMonitor(every_n_steps=1, record_validation=False)
    module = CausalLM(planted_llama().model, before_step=collapse)
    with pytest.warns(UserWarning, match=r"down_proj\[5, 17\] collapsed at train step 2"):
        trainer(tmp_path, [monitor]).fit(module, batches())
    flagged = [(e.kind, e.step) for e in monitor.events if (e.module, e.row, e.col) == SUPER]
    assert flagged == [("found", 0), ("collapsed", 2), ("drifted", 2)]
    rows = [r for r in logged_rows(tmp_path) if r.get("sw/event/collapsed/layer_1.row_5.col_17")]
    assert [r["step"] for r in rows] == ["2"]


def test_monitor_flags_weight_becoming_super(tmp_path) -> None:
    def become_super(module: CausalLM, step: int) -> None:
        if step == 2:
            plant_super_weight(module.net, 1, 5, 17, trigger_token=1, target_token=2)

    monitor = SuperWeightMonitor(every_n_steps=1, record_validation=False)
    module = CausalLM(tiny_model("llama"), before_step=become_super)
    with pytest.warns(UserWarning, match="appeared at train step 2"):
        trainer(tmp_path, [monitor]).fit(module, batches())
    assert [(e.kind, e.step, e.module, e.row, e.col) for e in monitor.events] == [
        ("appeared", 2, *SUPER)
    ]


def test_monitor_state_survives_resume(tmp_path) -> None:
    class Probe(Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            self.state = copy.deepcopy(second.state_dict())

    first = SuperWeightMonitor(every_n_steps=1)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    run = trainer(tmp_path, [first, checkpoints], enable_checkpointing=True, max_steps=3)
    run.fit(CausalLM(planted_llama().model), batches())
    before = copy.deepcopy(first.state_dict())
    second, probe = SuperWeightMonitor(every_n_steps=1), Probe()
    resumed = trainer(tmp_path, [second, probe], max_steps=5)
    resumed.fit(CausalLM(planted_llama().model), batches(), ckpt_path=tmp_path / "ckpt/last.ckpt")
    assert probe.state == before
    assert second.tracker.recordings == before["tracker"]["recordings"] + 2
    assert second.events[:2] == first.events  # history continues, nothing found twice


# -- misconfiguration --------------------------------------------------------------------
def test_monitor_without_logger_fails_at_setup(tmp_path) -> None:
    with pytest.raises(MisconfigurationException, match="has none: pass logger="):
        trainer(tmp_path, [SuperWeightMonitor()], logger=False).fit(
            CausalLM(planted_llama().model), batches()
        )


def test_model_without_down_projections_fails_at_setup(tmp_path) -> None:
    class Plain(CausalLM):
        def training_step(self, batch, batch_idx):
            return self.net(batch.float()).sum()

    with pytest.raises(MisconfigurationException, match="no MLP down-projection"):
        trainer(tmp_path, [SuperWeightMonitor()]).fit(Plain(torch.nn.Linear(32, 2)), batches())


@pytest.mark.parametrize("callback", [SuperWeightMonitor(), SuperWeightGuard([SUPER])])
def test_unsupported_strategy_fails_at_setup(callback) -> None:
    # Lightning itself refuses FSDP on CPU at Trainer(), so hand setup a stand-in trainer.
    from lightning.pytorch.strategies import FSDPStrategy

    stand_in = type("Trainer", (), {"strategy": FSDPStrategy(), "loggers": [object()]})()
    with pytest.raises(MisconfigurationException, match="does not support the FSDPStrategy"):
        callback.setup(stand_in, CausalLM(planted_llama().model), "fit")


def test_guard_without_weights_or_monitor_fails_at_setup(tmp_path) -> None:
    with pytest.raises(MisconfigurationException, match="has no super weights"):
        trainer(tmp_path, [SuperWeightGuard()]).fit(CausalLM(planted_llama().model), batches())


def test_freeze_with_weight_decay_fails_before_any_step(tmp_path) -> None:
    module = CausalLM(planted_llama().model, weight_decay=0.01)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    guard = SuperWeightGuard([SUPER], mode="freeze")
    with pytest.raises(MisconfigurationException, match="use mode='restore'"):
        trainer(tmp_path, [guard]).fit(module, batches())
    assert all(torch.equal(p, before[n]) for n, p in module.named_parameters())


# -- guard and ablation in a Trainer -----------------------------------------------------
@pytest.mark.parametrize(("mode", "weight_decay"), [("restore", 0.01), ("freeze", 0.0)])
def test_guard_callback_holds_weight_while_neighbours_move(tmp_path, mode, weight_decay) -> None:
    module = CausalLM(planted_llama().model, lr=1e-2, weight_decay=weight_decay)
    before = module.net.model.layers[1].mlp.down_proj.weight.detach().clone()
    guard = SuperWeightGuard([("model.layers.1.mlp.down_proj", 5, 17)], mode=mode)
    trainer(tmp_path, [guard]).fit(module, batches())
    after = module.net.model.layers[1].mlp.down_proj.weight.detach()
    assert guard.guarded == [SUPER]
    assert torch.equal(after[5, 17], before[5, 17])
    assert (after != before).float().mean() > 0.5  # the rest of the layer trained


def test_guard_follows_monitor(tmp_path) -> None:
    # lr 1e-2 rewires a 64-wide model in one step: the planted weight no longer matters then.
    module = CausalLM(planted_llama().model, lr=1e-3, weight_decay=0.01)
    run = trainer(tmp_path, [SuperWeightMonitor(every_n_steps=1), SuperWeightGuard()])
    run.fit(module, batches(), batches(4))
    monitor, guard = run.callbacks[:2]
    assert guard.guarded == [SUPER]  # the decoy is a measured candidate: not guarded
    assert float(weight(module, DECOY)) != 8.0
    value_after_step_0 = monitor.super_weights[0].value  # guarded from step 1 on
    assert float(weight(module, SUPER)) == value_after_step_0 != 8.0


def test_ablation_compare_logs_both_and_restores(tmp_path) -> None:
    module = CausalLM(planted_llama().model)
    before = copy.deepcopy(module.state_dict())
    ablation = SuperWeightAblation([("model.layers.1.mlp.down_proj", 5, 17)])
    (result,) = trainer(tmp_path, [ablation]).validate(module, batches(4), verbose=False)
    assert result["val_loss_ablated"] > result["val_loss"] + 0.1
    assert result["val_loss_ablated_delta"] == pytest.approx(
        result["val_loss_ablated"] - result["val_loss"], rel=1e-5
    )
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())
    assert "log" not in vars(module)


def test_ablation_alone_and_scaled_on_test(tmp_path) -> None:
    module = CausalLM(planted_llama().model)
    run = trainer(tmp_path, [])
    (plain,) = run.test(module, batches(4), verbose=False)
    scaled = SuperWeightAblation([SUPER], factor=-1.0, compare=False)
    (masked,) = trainer(tmp_path, [scaled]).test(module, batches(4), verbose=False)
    assert masked["test_loss"] > plain["test_loss"]
    assert set(masked) == {"test_loss"}
    assert float(weight(module, SUPER)) == 8.0


def test_ablation_restores_on_error(tmp_path) -> None:
    class Failing(CausalLM):
        def validation_step(self, batch, batch_idx):
            if batch_idx == 1:
                raise RuntimeError("boom")
            return super().validation_step(batch, batch_idx)

    module = Failing(planted_llama().model)
    ablation = SuperWeightAblation([SUPER], compare=False)
    with pytest.raises(RuntimeError, match="boom"):
        trainer(tmp_path, [ablation]).validate(module, batches(4), verbose=False)
    assert float(weight(module, SUPER)) == 8.0


def test_monitor_without_locations_still_flags_the_planted_weight(tmp_path) -> None:
    monitor = SuperWeightMonitor(every_n_steps=2, record_locations=False)
    trainer(tmp_path, [monitor]).fit(CausalLM(planted_llama().model), batches(), batches(4))
    assert [(e.kind, e.module, e.row, e.col) for e in monitor.events] == [
        ("found", *SUPER),
        ("found", *DECOY),
    ]
    assert all(bool((s.output.token == -1).all()) for s in monitor.last_stats.values())


# -- verification: a candidate is called super only once measured -------------------------
def test_monitor_verifies_candidates_through_fit(tmp_path) -> None:
    monitor = SuperWeightMonitor(every_n_steps=2)
    trainer(tmp_path, [monitor]).fit(CausalLM(planted_llama().model), batches(), batches(4))
    assert monitor.session.verifier.batch_source == "first validation batch"
    assert [w.coordinate for w in monitor.super_weights] == [SUPER]
    planted, decoy = monitor.candidates
    assert (planted.coordinate, planted.verdict) == (SUPER, "super") and planted.impact > 2.0
    assert (decoy.coordinate, decoy.verdict) == (DECOY, "candidate")
    assert decoy.impact == pytest.approx(1.0, abs=0.1)  # its row is hidden from the LM head
    assert [(e.kind, e.verdict, e.impact) for e in monitor.events] == [
        ("found", "super", planted.impact),
        ("found", "candidate", decoy.impact),
    ]
    assert monitor.events[0].describe().startswith("super weight net.model.layers.1")
    assert monitor.events[1].describe().startswith("candidate super weight net.model.layers.3")
    first = next(r for r in logged_rows(tmp_path) if r.get("sw/train/super_weights"))
    assert float(first["sw/train/super_weights"]) == 1.0
    assert float(first["sw/train/candidates"]) == 2.0
    assert float(first["sw/train/layer_1.row_5.col_17/impact"]) == pytest.approx(planted.impact)
    assert float(first["sw/train/layer_3.row_9.col_33/impact"]) == pytest.approx(decoy.impact)


def test_monitor_measures_each_candidate_once_and_not_again_after_resume(
    tmp_path, monkeypatch
) -> None:
    from sw_hooks.training import verification

    measured: list[list[str]] = []

    def counting(model, candidates, ids, settings):
        measured.append([c.module for c in candidates])
        return real(model, candidates, ids, settings)

    real = verification.measure_impacts
    monkeypatch.setattr(verification, "measure_impacts", counting)
    first = SuperWeightMonitor(every_n_steps=1)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    run = trainer(tmp_path, [first, checkpoints], enable_checkpointing=True, max_steps=3)
    run.fit(CausalLM(planted_llama().model), batches(), batches(4))
    assert measured == [["model.layers.1.mlp.down_proj", "model.layers.3.mlp.down_proj"]]
    saved = torch.load(tmp_path / "ckpt/last.ckpt", weights_only=False)["callbacks"]
    events = saved[first.state_key]["tracker"]["events"]
    assert [(e["verdict"], e["impact"]) for e in events] == [
        (e.verdict, e.impact) for e in first.events
    ]
    second = SuperWeightMonitor(every_n_steps=1)
    resumed = trainer(tmp_path, [second], max_steps=5)
    resumed.fit(
        CausalLM(planted_llama().model),
        batches(),
        batches(4),
        ckpt_path=tmp_path / "ckpt/last.ckpt",
    )
    assert len(measured) == 1  # nothing measured twice
    assert second.candidates == first.candidates


def test_guard_and_ablation_default_to_verified_super_weights(tmp_path) -> None:
    class Probe(Callback):
        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, *_) -> None:
            self.seen = (float(weight(pl_module, SUPER)), float(weight(pl_module, DECOY)))

    module = CausalLM(planted_llama().model, weight_decay=0.01)
    monitor, guard = SuperWeightMonitor(every_n_steps=1), SuperWeightGuard()
    ablation, probe = SuperWeightAblation(compare=False), Probe()
    trainer(tmp_path, [monitor, guard, ablation, probe]).fit(module, batches(), batches(4))
    assert guard.guarded == [SUPER]
    assert probe.seen[0] == 0.0 and probe.seen[1] != 0.0  # the decoy is not masked
    assert float(weight(module, DECOY)) != monitor.candidates[1].value  # nor guarded


def test_monitor_without_verification_acts_on_every_candidate(tmp_path) -> None:
    monitor, guard = SuperWeightMonitor(every_n_steps=1, verify=False), SuperWeightGuard()
    trainer(tmp_path, [monitor, guard]).fit(CausalLM(planted_llama().model), batches())
    assert guard.guarded == [SUPER, DECOY]
    assert monitor.super_weights == [] and len(monitor.candidates) == 2
    assert all(e.impact is None and e.verdict == "candidate" for e in monitor.events)
    assert monitor.events[0].describe().endswith("impact not measured")
    assert monitor.last_values["sw/train/candidates"] == 2.0
