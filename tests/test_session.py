"""The monitoring session on its own: a plain training loop, no Lightning, no ``Trainer``."""

from __future__ import annotations

import subprocess
import sys
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

from sw_hooks.testing import PlantedModel, plant_super_weight, planted_llama
from sw_hooks.training.monitor import NonFiniteActivationError, NonFiniteWarning, SpikeTracker
from sw_hooks.training.session import MonitorSession

SUPER = ("model.layers.1.mlp.down_proj", 5, 17)
DECOY = ("model.layers.3.mlp.down_proj", 9, 33)
NEW = ("model.layers.4.mlp.down_proj", 7, 40)
NEW_TRIGGER = 5
OVERFLOW_CHANNEL = 3
FILLER = 20


def down_proj(planted: PlantedModel, layer: int) -> nn.Module:
    return planted.model.model.layers[layer].mlp.down_proj


def batch(planted: PlantedModel, step: int, hide_trigger: bool = False) -> torch.Tensor:
    """Planted-model text that also holds ``NEW_TRIGGER`` (harmless until it is planted);
    ``hide_trigger`` replaces the causal super weight's trigger with filler."""
    ids = planted.calibration_ids(32, seed=step)
    ids[0, -3] = NEW_TRIGGER
    if hide_trigger:
        ids[ids == planted.causal[0].trigger_token] = FILLER
    return ids


def train(
    planted: PlantedModel,
    session: MonitorSession,
    steps: int,
    before_step: Callable[[int], None] = lambda step: None,
    hidden_trigger_steps: tuple[int, ...] = (),
) -> list[int]:
    """A plain loop: start, forward/backward/update, finish. Returns the steps decided on."""
    model = planted.model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    decided = []
    for step in range(steps):
        before_step(step)
        session.start(step)
        optimizer.zero_grad()
        ids = batch(planted, step, hide_trigger=step in hidden_trigger_steps)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        if session.finish("train") is not None:
            decided.append(step)
    return decided


def events(session: MonitorSession) -> list[tuple[str, int, str, int, int]]:
    return [(e.kind, e.step, e.module, e.row, e.col) for e in session.events]


def test_session_imports_no_training_framework() -> None:
    code = (
        "import sys, sw_hooks.training.session; "
        "loaded = [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning') "
        "or m.startswith('transformers.trainer')]; "
        "assert not loaded, loaded"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_session_flags_every_event_at_its_step() -> None:
    planted = planted_llama(num_layers=8)  # three spiking layers of eight stay outliers
    weight = down_proj(planted, 1).weight

    def change(step: int) -> None:
        with torch.no_grad():
            if step == 4:
                weight[5, 17] = 16.0  # drifts: twice its value (and a larger activation)
            if step == 5:
                weight[5, 17] = 8.0
            if step == 6:
                plant_super_weight(planted, 4, *NEW[1:], trigger_token=NEW_TRIGGER)

    # Measured on a calibration batch: the training batches put NEW_TRIGGER where the
    # super weight confidently predicts its target, which zeroing it helps.
    calibration = planted.calibration_ids(64)
    session = MonitorSession(
        planted.model, every_n_steps=1, collapse_factor=4.0, calibration=calibration
    )
    decided = train(planted, session, steps=7, before_step=change, hidden_trigger_steps=(2,))
    assert decided == [0, 1, 2, 3, 4, 5, 6]
    assert events(session) == [
        ("found", 0, *SUPER),
        ("found", 0, "model.layers.7.mlp.down_proj", 9, 33),
        ("collapsed", 2, *SUPER),  # no trigger in the batch: no super activation
        ("recovered", 3, *SUPER),
        ("drifted", 4, *SUPER),
        ("recovered", 5, *SUPER),
        ("appeared", 6, *NEW),
    ]
    verdicts = {(e.module, e.row, e.col): e.verdict for e in session.events}
    assert verdicts == {
        SUPER: "super",
        ("model.layers.7.mlp.down_proj", 9, 33): "candidate",
        NEW: "candidate",  # planted without a target: measured, and harmless
    }
    values = session.last_values
    assert values["sw/events/found"] == 2.0 and values["sw/events/recovered"] == 2.0
    assert values["sw/event/appeared/layer_4.row_7.col_40"] == 1.0
    assert values["sw/train/candidates"] == 3.0 and values["sw/train/super_weights"] == 1.0
    assert not down_proj(planted, 1)._forward_hooks  # nothing left attached


def test_session_records_only_due_steps(planted) -> None:
    session = MonitorSession(planted.model, every_n_steps=2)
    starts = []

    def watch_start(step: int) -> None:
        starts.append(session.recording)

    assert train(planted, session, steps=5, before_step=watch_start) == [0, 2, 4]
    assert starts == [False] * 5  # every recording ended at its own step
    assert [e.step for e in session.events] == [0, 0]
    assert session.step == 4 and session.tracker.recordings == 3


def test_session_start_always_records_off_schedule(planted) -> None:
    session = MonitorSession(planted.model, every_n_steps=50)
    assert session.start(7) is False and not session.recording
    assert session.start(7, always=True) is True
    with torch.no_grad():
        planted.model(planted.prompt())
    decision = session.finish("val")
    assert [(e.kind, e.step, e.stage) for e in decision.events] == [("found", 7, "val")] * 2
    assert decision.values["sw/val/layer_1.row_5.col_17/value"] == 8.0


def overflow_at(module: nn.Module, steps: set[int], current: Callable[[], int]):
    def hook(module: nn.Module, args: tuple[torch.Tensor, ...]):
        if current() not in steps:
            return None
        x = args[0].clone()
        x[..., 0, OVERFLOW_CHANNEL] = float("inf")
        return (x, *args[1:])

    return module.register_forward_pre_hook(hook)


def test_session_skips_non_finite_recordings_and_warns_once(planted) -> None:
    session = MonitorSession(planted.model, every_n_steps=1)
    step = 0

    def at(now: int) -> None:
        nonlocal step
        step = now

    handle = overflow_at(down_proj(planted, 1), {1, 2}, lambda: step)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        counts = []
        for now in range(4):
            at(now)
            session.start(now)
            planted.model(planted.prompt())
            decision = session.finish("train")
            counts.append((decision.skipped, decision.values["sw/nonfinite_steps"]))
    handle.remove()
    assert counts == [(False, 0.0), (True, 1.0), (True, 2.0), (False, 2.0)]
    skipped = [str(w.message) for w in caught if issubclass(w.category, NonFiniteWarning)]
    assert skipped == [
        f"non-finite activation (inf) in the input of {SUPER[0]}, channel {OVERFLOW_CHANNEL}, "
        "at train step 1: recording skipped (counted in sw/nonfinite_steps); "
        "pass strict=True to raise instead"
    ]
    assert session.nonfinite_steps == 2
    assert session.last_stats[SUPER[0]].calls == 1  # the last finite recording is kept
    assert [e.kind for e in session.events] == ["found", "found"]


def test_session_strict_raises_and_leaves_no_hook(planted) -> None:
    session = MonitorSession(planted.model, every_n_steps=1, strict=True)
    handle = overflow_at(down_proj(planted, 1), {0}, lambda: 0)
    session.start(0)
    with torch.no_grad():
        planted.model(planted.prompt())
    with pytest.raises(NonFiniteActivationError, match=r"channel 3, at train step 0"):
        session.finish("train")
    handle.remove()
    assert not down_proj(planted, 1)._forward_hooks and not session.recording


def test_session_state_round_trips_and_resumes(planted) -> None:
    first = MonitorSession(planted.model, every_n_steps=1)
    train(planted, first, steps=2)
    state = first.state_dict()
    assert set(state) == {"tracker", "last_values", "nonfinite_steps"}
    second = MonitorSession(planted.model, every_n_steps=1)
    second.load_state_dict(state)
    assert second.state_dict() == state
    train(planted, second, steps=2)
    assert second.tracker.recordings == 4
    assert events(second) == events(first)  # history continues, nothing found twice


def test_session_loads_the_callbacks_earlier_layouts(planted) -> None:
    tracker = SpikeTracker([SUPER])
    tracker.recordings = 3
    flat = {**tracker.state_dict(), "nonfinite_steps": 2}  # the Hugging Face callback's
    session = MonitorSession(planted.model)
    session.load_state_dict(flat)
    assert session.tracker.state_dict() == tracker.state_dict()
    assert session.nonfinite_steps == 2 and session.last_values == {}
    nested = {"tracker": tracker.state_dict()}  # the Lightning callback's, before counts
    session.load_state_dict(nested)
    assert session.nonfinite_steps == 0 and session.tracker.recordings == 3


def test_session_reduced_through_channel_max_decides_alike(planted) -> None:
    # Both record one model: one session's measurement would run through the other's hooks.
    plain = MonitorSession(planted.model, every_n_steps=1, verify=False)
    reduced = MonitorSession(
        planted.model, every_n_steps=1, reduce_across_processes=True, verify=False
    )
    for session in (plain, reduced):
        session.start(0)
    with torch.no_grad():
        planted.model(planted.prompt())
    decided = [session.finish("train") for session in (plain, reduced)]
    assert decided[0].values == decided[1].values
    assert events(plain) == events(reduced)


def test_session_binds_late_and_checks_its_input(planted) -> None:
    with pytest.raises(ValueError, match="every_n_steps must be a positive integer, got 0"):
        MonitorSession(every_n_steps=0)
    late = MonitorSession(super_weights=[("layers.1.mlp.down_proj", 5, 17)])
    with pytest.raises(RuntimeError, match=r"bind\(model\) first"):
        late.start(0)
    wrapper = nn.ModuleDict({"net": planted.model})
    late.bind(wrapper)
    assert [w.module for w in late.super_weights] == ["net." + SUPER[0]]
    with pytest.raises(ValueError, match="no MLP down-projection"):
        MonitorSession(nn.Linear(4, 4))
