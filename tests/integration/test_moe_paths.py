"""Mixture-of-experts models through the paths users take: ``sw-hooks detect`` and
``sw-hooks report``, the Lightning monitor and guard, on every planted MoE architecture in
the fused layout and on the list layout, with the same exact assertions as the dense models.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from sw_hooks.cli import main
from sw_hooks.testing import (
    MOE_ARCHITECTURES,
    planted_moe,
    save_checkpoint,
    to_expert_list,
)
from sw_hooks.training.lightning import SuperWeightGuard, SuperWeightMonitor

FUSED = "model.layers.1.mlp.experts.down_proj"
LISTED = "model.layers.1.mlp.experts.3.down_proj"
LAYOUTS = [*MOE_ARCHITECTURES, "list"]


class CharTokenizer:
    """Character codes as token ids: the planted triggers are ``\\x01`` .. ``\\x04``."""

    bos_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) % 256 for c in text]}


def planted(layout: str):
    model = planted_moe("mixtral" if layout == "list" else layout).model
    return to_expert_list(model) if layout == "list" else model


def trigger_text(path: Path) -> Path:
    # Both planted triggers with their targets, then filler (codes >= 40).
    path.write_text(
        "".join(f"\x01\x02\x03\x04{chr(40 + i % 60)}{chr(100 + i % 90)}" for i in range(40))
    )
    return path


@pytest.fixture
def cli_model(monkeypatch, request):
    model = planted(request.param)
    monkeypatch.setattr("sw_hooks.models.load_model", lambda *a, **k: (model, CharTokenizer()))
    return request.param


@pytest.mark.parametrize("cli_model", LAYOUTS, indirect=True)
def test_cli_detect_lists_the_expert_weight_and_the_super_expert(cli_model, tmp_path, capsys):
    out = tmp_path / "result.json"
    argv = ["detect", "--text", str(trigger_text(tmp_path / "t.txt")), "--max-tokens", "96"]
    assert main([*argv, "--json", str(out), "--quiet"]) == 0
    table = capsys.readouterr().out
    data = json.loads(out.read_text())
    module = LISTED if cli_model == "list" else FUSED
    found = [
        (w["module"], w["layer"], w["expert"], w["row"], w["col"], w["verdict"])
        for w in data["candidates"]
    ]
    assert found == [(module, 1, 3, 5, 17, "super")]
    experts = [
        (e["module"], e["layer"], e["expert"], e["channel"], e["verdict"])
        for e in data["super_experts"]
    ]
    assert experts == [("model.layers.1.mlp.experts", 1, 3, 5, "super")]
    header = next(line for line in table.splitlines() if line.startswith("layer"))
    assert "expert" in header.split() and "super experts" in table


@pytest.mark.parametrize("cli_model", LAYOUTS, indirect=True)
def test_cli_report_shows_expert_weights_and_super_experts(cli_model, tmp_path, capsys):
    out = tmp_path / "report"
    argv = ["report", "--text", str(trigger_text(tmp_path / "t.txt")), "--out", str(out)]
    assert main([*argv, "--max-tokens", "96", "--block-size", "64", "--quiet"]) == 0
    detection = json.loads((out / "report.json").read_text())["detection"]
    verified = [
        (w["layer"], w["expert"], w["row"], w["col"])
        for w in detection["candidates"]
        if w["verdict"] == "super"
    ]
    assert verified == [(1, 3, 5, 17)]
    markdown = (out / "report.md").read_text()
    assert "| layer | expert | module |" in markdown and "# Super experts" in markdown
    # The restored row needs restore_activation, which cannot act inside experts.
    assert "super activation restored" not in markdown and "super weights pruned" in markdown


def test_installed_command_detects_a_saved_moe_checkpoint(tmp_path):
    folder = tmp_path / "moe"
    save_checkpoint(planted("mixtral"), folder)
    # The byte tokenizer's ids 1..4 are the characters '"', '#', '$' and '%'.
    text = tmp_path / "text.txt"
    text.write_text("".join(f'"#$%{chr(97 + i % 26)}{chr(65 + i % 26)}' for i in range(40)))
    out = tmp_path / "result.json"
    command = [sys.executable, "-m", "sw_hooks.cli", "detect", str(folder), "--text", str(text)]
    done = subprocess.run(
        [*command, "--json", str(out), "--quiet"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads(out.read_text())
    assert [
        (w["module"], w["expert"], w["row"], w["col"], w["verdict"]) for w in data["candidates"]
    ] == [(FUSED, 3, 5, 17, "super")]


class CausalLM(pl.LightningModule):
    def __init__(
        self, net: torch.nn.Module, *, lr: float = 1e-3, weight_decay: float = 0.0
    ) -> None:
        super().__init__()
        self.net, self.lr, self.weight_decay = net, lr, weight_decay

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.net(input_ids=batch, labels=batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


def batches() -> DataLoader:
    fixture = planted_moe("mixtral")
    return DataLoader(
        torch.cat([fixture.calibration_ids(32, seed=i) for i in range(6)]), batch_size=2
    )


def fit(module: pl.LightningModule, callbacks: list, tmp_path: Path) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=3,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=pl.loggers.CSVLogger(tmp_path, name="run"),
        callbacks=callbacks,
    )
    trainer.fit(module, batches())
    return trainer


def expert_weight(module: pl.LightningModule, layout: str) -> torch.Tensor:
    experts = module.net.model.layers[1].mlp.experts
    if layout == "list":
        return experts[3].down_proj.weight[5, 17].detach().clone()
    return experts.down_proj[3, 5, 17].detach().clone()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_lightning_monitor_finds_and_guard_holds_the_expert_weight(layout, tmp_path):
    module = CausalLM(planted(layout), weight_decay=0.01)
    before = expert_weight(module, layout)
    monitor = SuperWeightMonitor(every_n_steps=1)
    fit(module, [monitor, SuperWeightGuard()], tmp_path)
    module_name = "net." + (LISTED if layout == "list" else FUSED)
    found = [(e.kind, e.step, e.module, e.expert, e.row, e.col) for e in monitor.events]
    assert found == [("found", 0, module_name, 3, 5, 17)]
    state = monitor.state_dict()
    restored = SuperWeightMonitor(every_n_steps=1)
    restored.load_state_dict(state)
    assert [(w.module, w.expert, w.row, w.col) for w in restored.super_weights] == [
        (module_name, 3, 5, 17)
    ]
    # Guarded from step 1 on: its value after step 0's update stays, to the bit.
    assert float(expert_weight(module, layout)) == monitor.super_weights[0].value != float(before)
