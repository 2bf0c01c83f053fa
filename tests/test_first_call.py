"""record(model) on a hand-written module with nothing else: found on its first call.

The model has no module names a table knows and no Hugging Face config, so no example
input can be built; its down-projections are found by structure on the call the user
makes, and that call is recorded. The Lightning and Hugging Face monitors do the same.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import Trainer, TrainingArguments

from sw_hooks.core.locate import find_down_projections
from sw_hooks.core.record import record
from sw_hooks.core.structure import ExampleInputNeeded
from sw_hooks.testing import HandWritten, family_input
from sw_hooks.testing.families import plant_spike_pair
from sw_hooks.training.hf import SuperWeightCallback
from sw_hooks.training.lightning import SuperWeightMonitor

ROW, COL = 7, 33
PROJECTIONS = ["blocks.0.narrow", "blocks.1.narrow", "blocks.2.narrow"]


def planted_net() -> HandWritten:
    torch.manual_seed(0)
    net = HandWritten(3).eval()
    plant_spike_pair(net, "blocks.1.narrow", ROW, COL, value=50.0)
    return net


def ids() -> torch.Tensor:
    return family_input(HandWritten())["ids"]


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_the_hand_written_model_needs_an_input_to_be_located():
    with pytest.raises(ExampleInputNeeded, match="pass example_input="):
        find_down_projections(planted_net())


def test_record_locates_on_the_first_call_and_records_that_call():
    net = planted_net()
    with record(net) as rec, torch.no_grad():
        assert rec.module_names == () and hook_count(net) > 0
        net(ids())
        assert list(rec.module_names) == PROJECTIONS
        assert hook_count(net) == len(PROJECTIONS)  # the locating hooks are gone
        net(ids())
    spiked = rec.stats["blocks.1.narrow"]
    assert spiked.calls == 2
    assert spiked.input.top()[0] == COL and spiked.output.top()[0] == ROW
    assert float(spiked.output.abs_max[ROW]) > 20 * float(
        rec.stats["blocks.0.narrow"].output.abs_max.max()
    )
    assert list(rec.modules) == PROJECTIONS
    assert hook_count(net) == 0


class Wrapper(nn.Module):
    """Calls the network it holds from a method, never through its own forward."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.head = net, nn.Linear(64, 4)

    def step(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x))


def test_a_wrapped_network_is_located_where_it_is_called():
    wrapper = Wrapper(planted_net())
    with record(wrapper) as rec, torch.no_grad():
        wrapper.head(torch.zeros(1, 64))  # a part without projections: keeps waiting
        wrapper.step(ids())
    assert list(rec.stats) == [f"net.{name}" for name in PROJECTIONS]
    assert rec.stats["net.blocks.1.narrow"].output.top()[0] == ROW
    assert hook_count(wrapper) == 0


class Masked(HandWritten):
    """Takes a padding mask (and ignores it): the recorder reads it from the call."""

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        return super().forward(ids)


def test_the_first_call_s_padding_mask_is_applied():
    torch.manual_seed(0)
    net = Masked(3).eval()
    plant_spike_pair(net, "blocks.1.narrow", ROW, COL, value=50.0)
    with record(net) as rec, torch.no_grad():
        net(ids())
    spike = rec.stats["blocks.1.narrow"].input
    mask = torch.ones_like(ids())
    mask[0, int(spike.token[COL])] = 0  # the spiking token is padding
    with record(net) as masked, torch.no_grad():
        net(ids(), attention_mask=mask)
    assert float(masked.stats["blocks.1.narrow"].input.abs_max[COL]) < 0.5 * float(
        spike.abs_max[COL]
    )


class NoResidual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def test_a_model_without_projections_fails_on_its_first_call_and_keeps_no_hook():
    model = NoResidual()
    rec = record(model)
    with pytest.raises(ValueError, match=r"no MLP down-projection .* in NoResidual.*either"):
        model(torch.ones(1, 8))
    assert hook_count(model) == 0
    rec.remove()
    with pytest.raises(ValueError, match="fewer than two linears"):
        record(nn.Linear(8, 8))  # nothing a call could find: refused at once


# -- the monitors, through the trainers ---------------------------------------------------
class TokenBatches(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"ids": ids()[0]}


class Regression(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = planted_net().train()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.net(batch["ids"]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-4)


def test_lightning_monitor_finds_the_planted_weight_of_a_hand_written_model(tmp_path):
    monitor = SuperWeightMonitor(every_n_steps=1, require_logger=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        callbacks=[monitor],
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(Regression(), DataLoader(TokenBatches(), batch_size=2))
    found = [(e.kind, e.step, e.module, e.row, e.col) for e in monitor.events]
    assert found == [("found", 0, "net.blocks.1.narrow", ROW, COL)]
    assert monitor.session.tracker.recordings == 3


class WithLoss(nn.Module):
    """What the Hugging Face ``Trainer`` calls: keyword inputs in, ``{"loss": ...}`` out."""

    def __init__(self) -> None:
        super().__init__()
        self.net = planted_net()

    def forward(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": self.net(ids).pow(2).mean()}


def test_hugging_face_callback_finds_the_planted_weight_of_a_hand_written_model(tmp_path):
    callback = SuperWeightCallback(every_n_steps=1)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-4,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    Trainer(model=WithLoss(), args=args, train_dataset=TokenBatches(), callbacks=[callback]).train()
    found = [(e.kind, e.step, e.module, e.row, e.col) for e in callback.events]
    assert found == [("found", 0, "net.blocks.1.narrow", ROW, COL)]
