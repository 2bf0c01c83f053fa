"""Padded batches on the paths users take: the mask reaches the recorder wherever it is passed.

A training wrapper (a ``LightningModule``, a plain ``nn.Module``) hands ``attention_mask=``
to the Hugging Face model it holds, not to the module the recorder hooks. The fixture
makes that matter: the pad token drives a planted weight of its own in layer 3, so an
unmasked pad position holds that layer's largest activation and raises a spike pair
that the real tokens never show.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader
from transformers import Trainer, TrainingArguments

from sw_hooks.analysis.detect import spike_candidates
from sw_hooks.core.record import ChannelMaxima, ChannelStats, channel_maxima, record
from sw_hooks.testing import plant_super_weight, planted_llama
from sw_hooks.testing.datasets import Sequences
from sw_hooks.training.hf import SuperWeightCallback
from sw_hooks.training.lightning import SuperWeightMonitor
from sw_hooks.training.monitor import watch

PAD = 0
SUPER = ("model.layers.1.mlp.down_proj", 5, 17)
DECOY = ("model.layers.5.mlp.down_proj", 9, 33)
PAD_DRIVEN = ("model.layers.3.mlp.down_proj", 20, 50)
# Left pads per sequence; batches of two: (0, 0), (5, 0), (3, 1), (6, 0). The first batch
# has no padding, so a spike pair raised by pads shows up later, as "appeared".
PADS = (0, 0, 5, 0, 3, 1, 6, 0)
LENGTH = 16
# Real tokens drive layer 3's input to about 0.1; a pad token drives channel 50 to about 574.
QUIET = 1.0


def padded_model() -> nn.Module:
    """Six-layer planted Llama (super weight in layer 1, decoy in 5) whose pad token drives
    ``PAD_DRIVEN``: harmless on real text, the largest activation of layer 3 on padding."""
    planted = planted_llama(num_layers=6)
    layer, row, col = 3, PAD_DRIVEN[1], PAD_DRIVEN[2]
    return plant_super_weight(planted, layer, row, col, trigger_token=PAD).model


def padded_sequences() -> list[dict[str, torch.Tensor]]:
    """Planted-model text (both real triggers in every sequence), left-padded per ``PADS``."""
    text = planted_llama(num_layers=6)
    sequences = []
    for index, pads in enumerate(PADS):
        ids = text.calibration_ids(LENGTH, seed=index)[0]
        ids[:pads] = PAD
        mask = (ids != PAD).long()
        sequences.append(
            {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
        )
    return sequences


def batches() -> DataLoader:
    return DataLoader(Sequences(padded_sequences()), batch_size=2)


def maxima_at_padding(stats: Mapping[str, ChannelStats], mask: torch.Tensor) -> list[str]:
    """``<module>.<side>`` of every recorded side with a channel whose maximum is a pad token."""
    real = mask.bool()
    hits = []
    for name, module_stats in stats.items():
        for side in ("input", "output"):
            maxima = getattr(module_stats, side)
            if maxima is not None and not bool(real[maxima.batch, maxima.token].all()):
                hits.append(f"{name}.{side}")
    return hits


def assert_same_maxima(got: ChannelMaxima | None, want: ChannelMaxima) -> None:
    assert got is not None
    for field in ("abs_max", "value", "token", "batch"):
        assert torch.equal(getattr(got, field), getattr(want, field)), field


def events_of(events: list[Any], prefix: str = "") -> list[tuple]:
    return [(e.kind, e.step, e.module.removeprefix(prefix), e.row, e.col) for e in events]


class Wrapper(nn.Module):
    """A training wrapper: takes the whole batch and calls the model it holds with the mask."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.net(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
        ).loss


# -- the recorder -----------------------------------------------------------------------
def test_record_wrapper_takes_the_mask_given_to_the_inner_model() -> None:
    wrapper = Wrapper(padded_model())
    batch = next(iter(DataLoader(Sequences(padded_sequences()), batch_size=4)))  # pads (0, 0, 5, 0)
    mask = batch["attention_mask"].bool()
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = [
        wrapper.net.get_submodule(name).register_forward_hook(
            lambda module, args, output, name=name: seen.__setitem__(name, (args[0], output))
        )
        for name in (f"model.layers.{i}.mlp.down_proj" for i in range(6))
    ]
    with record(wrapper, locations=True) as rec, torch.no_grad():
        wrapper(batch)
    for handle in handles:
        handle.remove()
    assert maxima_at_padding(rec.stats, mask) == []
    assert len(seen) == 6
    for name, (x, y) in seen.items():  # the same as masking the activations by hand
        assert_same_maxima(rec.stats[f"net.{name}"].input, channel_maxima(x, mask))
        assert_same_maxima(rec.stats[f"net.{name}"].output, channel_maxima(y, mask))
    assert float(rec.stats["net." + PAD_DRIVEN[0]].input.abs_max.max()) < QUIET


def test_mask_survives_inner_calls_without_one_and_ends_with_the_call() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mlp = nn.ModuleDict({"down_proj": nn.Linear(2, 2)})

        def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None):
            return self.mlp["down_proj"](x)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([Block()])

        def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None):
            return self.layers[0](x, attention_mask=None)  # must not clear the outer mask

    class Root(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = Model()

        def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None):
            return self.model(x, attention_mask=mask)

    root = Root()
    with torch.no_grad():
        root.model.layers[0].mlp["down_proj"].weight.copy_(torch.eye(2))
        root.model.layers[0].mlp["down_proj"].bias.zero_()
    x = torch.tensor([[[100.0, -100.0], [1.0, 2.0], [-3.0, 0.5]]])
    name = "model.layers.0.mlp.down_proj"
    with record(root) as rec, torch.no_grad():
        root(x, torch.tensor([[0, 1, 1]]))
        masked = rec.stats[name].output
        rec.reset()
        root(x)  # no mask on this call: the previous one must not linger
    assert masked.value.tolist() == [-3.0, 2.0] and masked.token.tolist() == [2, 1]
    assert rec.stats[name].output.value.tolist() == [100.0, -100.0]


def test_only_ancestors_that_can_take_a_mask_are_hooked() -> None:
    wrapper = Wrapper(padded_model())
    with record(wrapper):
        hooked = {name for name, m in wrapper.named_modules() if m._forward_pre_hooks}
    # The wrapper (forward(batch)) and the MLPs (forward(x)) cannot be given
    # attention_mask=; attention, norms and embeddings hold no down-projection.
    assert hooked == {"net", "net.model", *(f"net.model.layers.{i}" for i in range(6))}


# -- Lightning -------------------------------------------------------------------------
class PaddedLM(pl.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.net(**batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class StatsProbe(Callback):
    """Keeps each training batch's mask with what the monitor recorded on it."""

    def __init__(self, monitor: SuperWeightMonitor) -> None:
        self.monitor = monitor
        self.seen: list[tuple[torch.Tensor, dict[str, ChannelStats]]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen.append((batch["attention_mask"].clone(), self.monitor.last_stats))


def test_lightning_monitor_leaves_padding_out(tmp_path: Path) -> None:
    monitor = SuperWeightMonitor(every_n_steps=1, record_validation=False, require_logger=False)
    probe = StatsProbe(monitor)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[monitor, probe],
    )
    trainer.fit(PaddedLM(padded_model()), batches())
    assert events_of(monitor.events, "net.") == [("found", 0, *SUPER), ("found", 0, *DECOY)]
    assert len(probe.seen) == 4 and all(len(stats) == 6 for _, stats in probe.seen)
    assert [maxima_at_padding(stats, mask) for mask, stats in probe.seen] == [[]] * 4
    layer_3 = [float(s["net." + PAD_DRIVEN[0]].input.abs_max.max()) for _, s in probe.seen]
    assert max(layer_3) < QUIET


# -- Hugging Face Trainer ----------------------------------------------------------------
def test_hf_trainer_callback_leaves_padding_out(tmp_path: Path) -> None:
    callback = SuperWeightCallback(every_n_steps=1)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    model = padded_model().train()
    trainer = Trainer(
        model=model, args=args, train_dataset=Sequences(padded_sequences()), callbacks=[callback]
    )
    trainer.train()
    assert [(kind, *rest) for kind, _, *rest in events_of(callback.events)] == [
        ("found", *SUPER),
        ("found", *DECOY),
    ]
    logged = [h for h in trainer.state.log_history if "sw/train/layer_3/input_max" in h]
    assert [h["step"] for h in logged] == [0, 1, 2, 3]
    assert max(h["sw/train/layer_3/input_max"] for h in logged) < QUIET


# -- watch() around a hand-written loop ----------------------------------------------------
def test_watch_around_a_training_loop_leaves_padding_out() -> None:
    model = Wrapper(padded_model()).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    at_padding, layer_3 = [], []
    with watch(model, stage="train") as seen:
        for step, batch in enumerate(batches()):
            model(batch).backward()
            optimizer.step()
            optimizer.zero_grad()
            stats = seen.recorder.stats
            at_padding.append(maxima_at_padding(stats, batch["attention_mask"]))
            layer_3.append(float(stats["net." + PAD_DRIVEN[0]].input.abs_max.max()))
            seen.check(step, stage="train")
    assert events_of(seen.events, "net.") == [("found", 0, *SUPER), ("found", 0, *DECOY)]
    assert at_padding == [[]] * 4
    assert max(layer_3) < QUIET


def test_unmasked_padding_would_raise_a_spike_pair() -> None:
    """The fixture's premise: without the mask, a pad token wins layer 3 and is a spike pair."""
    wrapper = Wrapper(padded_model())
    batch = next(iter(DataLoader(Sequences(padded_sequences()), batch_size=4)))  # pads (0, 0, 5, 0)
    with record(wrapper, use_attention_mask=False) as rec, torch.no_grad():
        wrapper(batch)
    found = [(w.module, w.row, w.col) for w in spike_candidates(wrapper, rec.stats)]
    assert found == [("net." + name, row, col) for name, row, col in (SUPER, PAD_DRIVEN, DECOY)]
    pad_driven = rec.stats["net." + PAD_DRIVEN[0]].output
    assert int(pad_driven.batch[PAD_DRIVEN[1]]) == 2 and int(pad_driven.token[PAD_DRIVEN[1]]) < 5
