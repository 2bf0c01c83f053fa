"""Fine-tune SmolLM2-135M for a few steps with a Lightning Trainer, monitored and guarded.

    python integrations/lightning_finetune.py

The LightningModule is plain; the monitor finds the down-projections itself, the guard
keeps the known super weight bit-identical while AdamW (with weight decay) trains the rest.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
from common import SUPER_WEIGHT, chunks, model_and_tokenizer  # noqa: E402

from sw_hooks.training.lightning import SuperWeightGuard, SuperWeightMonitor  # noqa: E402


class CausalLM(pl.LightningModule):
    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.net(input_ids=batch, labels=batch).loss
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-4, weight_decay=0.01)


def main(model=None, tokenizer=None, steps: int = 3, out: str = "lightning_logs") -> dict:
    model, tokenizer = model_and_tokenizer(model, tokenizer)
    module = CausalLM(model.train())
    monitor = SuperWeightMonitor(every_n_steps=1, record_validation=False)
    guard = SuperWeightGuard([SUPER_WEIGHT])  # "restore": exact even with weight decay
    before = model.get_submodule(SUPER_WEIGHT[0]).weight.detach().clone()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=CSVLogger(out, name="finetune"),
        callbacks=[monitor, guard],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, DataLoader(chunks(tokenizer, count=steps), batch_size=1))
    after = model.get_submodule(SUPER_WEIGHT[0]).weight.detach()
    for event in monitor.events:
        print(event.describe())
    return {"monitor": monitor, "guard": guard, "before": before, "after": after, "out": out}


if __name__ == "__main__":
    main()
