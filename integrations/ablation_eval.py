"""Evaluate SmolLM2-135M with and without its super weight, inside a Lightning validation run.

    python integrations/ablation_eval.py

Logs ``val_loss``, ``val_loss_ablated`` and ``val_loss_ablated_delta``; the weight is
restored bit for bit after each masked batch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
from common import SUPER_WEIGHT, chunks, model_and_tokenizer  # noqa: E402

from sw_hooks.training.lightning import SuperWeightAblation  # noqa: E402


class CausalLM(pl.LightningModule):
    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("val_loss", self.net(input_ids=batch, labels=batch).loss)


def main(model=None, tokenizer=None, batches: int = 2) -> dict:
    model, tokenizer = model_and_tokenizer(model, tokenizer)
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        callbacks=[SuperWeightAblation([SUPER_WEIGHT])],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = DataLoader(chunks(tokenizer, count=batches), batch_size=1)
    (result,) = trainer.validate(CausalLM(model.eval()), loader, verbose=False)
    print({k: round(v, 4) for k, v in result.items()})
    return result


if __name__ == "__main__":
    main()
