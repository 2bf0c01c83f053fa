"""The monitors on a run where one step overflows: training goes on, one warning, a count.

An fp16 overflow makes one step's activations infinite; ``GradScaler`` skips that step's
optimizer update and training continues. The monitors must do the same: skip the
recording, warn once, count the step under ``sw/nonfinite_steps``, and raise only when
asked to (``strict=True``). Here the overflow is an infinite value written into one
down-projection input channel at one step, and the optimizer skips steps whose
gradients are not finite, as ``GradScaler`` does.
"""

from __future__ import annotations

import csv
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.hooks import RemovableHandle
from transformers import Trainer, TrainingArguments

from sw_hooks.testing import planted_llama
from sw_hooks.testing.datasets import Sequences
from sw_hooks.training.hf import SuperWeightCallback
from sw_hooks.training.lightning import SuperWeightMonitor
from sw_hooks.training.monitor import watch

OVERFLOW_CHANNEL = 3
SUPER = ("model.layers.1.mlp.down_proj", 5, 17)
DECOY = ("model.layers.3.mlp.down_proj", 9, 33)


class SkipsNonFiniteSteps(torch.optim.AdamW):
    """AdamW that skips a step whose gradients hold NaN or inf, as ``GradScaler`` does."""

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = [p.grad for group in self.param_groups for p in group["params"]]
        if all(g is None or bool(g.isfinite().all()) for g in grads):
            super().step()
        return loss


def overflow_at(
    down_proj: nn.Module, current_step: Callable[[], int], steps: Iterable[int]
) -> RemovableHandle:
    """Write ``inf`` into input channel ``OVERFLOW_CHANNEL`` of the first token at ``steps``."""
    overflowing = set(steps)

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...] | None:
        if current_step() not in overflowing:
            return None
        x = args[0].clone()
        x[..., 0, OVERFLOW_CHANNEL] = float("inf")
        return (x, *args[1:])

    return down_proj.register_forward_pre_hook(hook)


def nonfinite_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "non-finite activation" in str(w.message)]


def message(module: str, stage: str, step: int) -> str:
    return f"in the input of {module}, channel {OVERFLOW_CHANNEL}, at {stage} step {step}"


# -- Lightning ---------------------------------------------------------------------------
class CausalLM(pl.LightningModule):
    """A plain LightningModule around a Hugging Face causal LM, with a GradScaler-like optimizer."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.net(input_ids=batch, labels=batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return SkipsNonFiniteSteps(self.parameters(), lr=1e-3)


def fit(tmp_path: Path, monitor: SuperWeightMonitor, overflow_steps: Iterable[int]) -> pl.Trainer:
    module = CausalLM(planted_llama().model)
    down_proj = module.net.model.layers[1].mlp.down_proj
    handle = overflow_at(down_proj, lambda: module.global_step, overflow_steps)
    planted = planted_llama()
    ids = torch.cat([planted.calibration_ids(32, seed=i) for i in range(8)])
    trainer = pl.Trainer(
        callbacks=[monitor],
        accelerator="cpu",
        devices=1,
        max_steps=4,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=CSVLogger(tmp_path, name="run"),
    )
    try:
        trainer.fit(module, DataLoader(ids, batch_size=2))
    finally:
        handle.remove()
        assert not down_proj._forward_hooks  # the monitor's recorder is gone, even on error
    return trainer


def logged_counts(tmp_path: Path) -> dict[str, str]:
    (path,) = tmp_path.glob("run/version_*/metrics.csv")
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    return {r["step"]: r["sw/nonfinite_steps"] for r in rows if r.get("sw/nonfinite_steps")}


def test_lightning_monitor_skips_an_overflowing_step_and_warns_once(tmp_path) -> None:
    monitor = SuperWeightMonitor(every_n_steps=1, record_validation=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fit(tmp_path, monitor, overflow_steps=[1])
    assert trainer.global_step == 4  # every step ran
    assert nonfinite_warnings(caught) == [
        f"non-finite activation (inf) {message('net.' + SUPER[0], 'train', 1)}: recording "
        "skipped (counted in sw/nonfinite_steps); pass strict=True to raise instead"
    ]
    assert logged_counts(tmp_path) == {"0": "0.0", "1": "1.0", "2": "1.0", "3": "1.0"}
    assert [(e.kind, e.step, e.module) for e in monitor.events] == [
        ("found", 0, "net." + SUPER[0]),
        ("found", 0, "net." + DECOY[0]),
    ]
    assert monitor.state_dict()["nonfinite_steps"] == 1
    # Step 0's measurement ran into step 1's overflow: the candidates stayed unmeasured,
    # with a warning, and were measured at the next finite recording.
    assert [e.impact for e in monitor.events] == [None, None]
    assert any("could not measure candidate(s)" in str(w.message) for w in caught)
    assert [w.verdict for w in monitor.candidates] == ["super", "candidate"]


def test_lightning_monitor_warns_once_for_several_overflows(tmp_path) -> None:
    monitor = SuperWeightMonitor(every_n_steps=1, record_validation=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tmp_path, monitor, overflow_steps=[1, 3])
    assert len(nonfinite_warnings(caught)) == 1
    assert logged_counts(tmp_path) == {"0": "0.0", "1": "1.0", "2": "1.0", "3": "2.0"}


def test_lightning_monitor_strict_raises_at_the_overflowing_step(tmp_path) -> None:
    monitor = SuperWeightMonitor(every_n_steps=1, record_validation=False, strict=True)
    with pytest.raises(
        ValueError, match=message(r"net\.model\.layers\.1\.mlp\.down_proj", "train", 1)
    ):
        fit(tmp_path, monitor, overflow_steps=[1])


# -- Hugging Face Trainer ----------------------------------------------------------------
def train(tmp_path: Path, callback: SuperWeightCallback, overflow_steps: Iterable[int]) -> Trainer:
    model = planted_llama().model.train()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    optimizer = SkipsNonFiniteSteps(model.parameters(), lr=1e-3)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Sequences.planted(8),
        callbacks=[callback],
        optimizers=(optimizer, None),
    )
    down_proj = model.model.layers[1].mlp.down_proj
    handle = overflow_at(down_proj, lambda: trainer.state.global_step, overflow_steps)
    try:
        trainer.train()
    finally:
        handle.remove()
        assert not down_proj._forward_hooks
    return trainer


def test_hf_callback_skips_an_overflowing_step_and_warns_once(tmp_path) -> None:
    callback = SuperWeightCallback(every_n_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = train(tmp_path, callback, overflow_steps=[1, 2])
    assert trainer.state.global_step == 4
    assert nonfinite_warnings(caught) == [
        f"non-finite activation (inf) {message(SUPER[0], 'train', 1)}: recording "
        "skipped (counted in sw/nonfinite_steps); pass strict=True to raise instead"
    ]
    counts = [
        (h["step"], h["sw/nonfinite_steps"])
        for h in trainer.state.log_history
        if "sw/nonfinite_steps" in h
    ]
    assert counts == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 2.0)]
    assert [(e.kind, e.step, e.module) for e in callback.events] == [
        ("found", 0, SUPER[0]),
        ("found", 0, DECOY[0]),
    ]


def test_hf_callback_strict_raises_at_the_overflowing_step(tmp_path) -> None:
    callback = SuperWeightCallback(every_n_steps=1, strict=True)
    with pytest.raises(ValueError, match=message(r"model\.layers\.1\.mlp\.down_proj", "train", 1)):
        train(tmp_path, callback, overflow_steps=[1])


# -- watch() -----------------------------------------------------------------------------
def test_watch_skips_overflowing_checks_and_warns_once(planted) -> None:
    step = 0
    down_proj = planted.model.model.layers[1].mlp.down_proj
    handle = overflow_at(down_proj, lambda: step, steps=[1, 2])
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        with watch(planted.model) as seen:
            for step in range(4):  # noqa: B007 - read by the hook
                planted.model(planted.prompt())
                seen.check(step)
                assert seen.values["sw/nonfinite_steps"] == [0.0, 1.0, 2.0, 2.0][step]
    handle.remove()
    assert nonfinite_warnings(caught) == [
        f"non-finite activation (inf) {message(SUPER[0], 'watch', 1)}: recording "
        "skipped (counted in sw/nonfinite_steps); pass strict=True to raise instead"
    ]
    assert [(e.kind, e.step, e.module) for e in seen.events] == [
        ("found", 0, SUPER[0]),
        ("found", 0, DECOY[0]),
    ]
    assert seen.values["sw/watch/layer_1.row_5.col_17/value"] == 8.0


def test_watch_strict_raises_and_removes_its_hooks(planted) -> None:
    down_proj = planted.model.model.layers[1].mlp.down_proj
    handle = overflow_at(down_proj, lambda: 0, steps=[0])
    with (
        pytest.raises(ValueError, match=message(r"model\.layers\.1\.mlp\.down_proj", "watch", 0)),
        watch(planted.model, strict=True),
        torch.no_grad(),
    ):
        planted.model(planted.prompt())
    handle.remove()
    assert not down_proj._forward_hooks
