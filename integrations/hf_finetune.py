"""Fine-tune SmolLM2-135M for a few steps with the Hugging Face Trainer, monitored and guarded.

python integrations/hf_finetune.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

sys.path.insert(0, str(Path(__file__).parent))
from common import SUPER_WEIGHT, chunks, model_and_tokenizer  # noqa: E402

from sw_hooks.training.hf import SuperWeightCallback  # noqa: E402


def main(model=None, tokenizer=None, steps: int = 3, out: str = "hf_out") -> dict:
    model, tokenizer = model_and_tokenizer(model, tokenizer)
    # The GGUF weights were dequantized to float32 on load, but transformers still tags the
    # model as quantized and would refuse to train it; it is a plain float model.
    model.hf_quantizer, model.is_quantized = None, False
    data = [{"input_ids": ids, "labels": ids} for ids in chunks(tokenizer, count=steps)]
    callback = SuperWeightCallback([SUPER_WEIGHT], every_n_steps=1, guard="restore")
    args = TrainingArguments(
        output_dir=out,
        max_steps=steps,
        per_device_train_batch_size=1,
        learning_rate=1e-4,
        weight_decay=0.01,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    before = model.get_submodule(SUPER_WEIGHT[0]).weight.detach().clone()
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()
    after = model.get_submodule(SUPER_WEIGHT[0]).weight.detach()
    for event in callback.events:
        print(event.describe())
    return {"callback": callback, "trainer": trainer, "before": before, "after": after}


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
