"""A plain PyTorch training loop with the monitor and the guard as context managers.

python integrations/plain_loop.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import SUPER_WEIGHT, chunks, model_and_tokenizer  # noqa: E402

from sw_hooks.training.guard import guard  # noqa: E402
from sw_hooks.training.monitor import watch  # noqa: E402


def main(model=None, tokenizer=None, steps: int = 2) -> dict:
    model, tokenizer = model_and_tokenizer(model, tokenizer)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    before = model.get_submodule(SUPER_WEIGHT[0]).weight.detach().clone()
    with guard(model, [SUPER_WEIGHT], optimizer), watch(model) as seen:
        for step, ids in enumerate(chunks(tokenizer, count=steps)):
            optimizer.zero_grad()
            model(input_ids=ids[None], labels=ids[None]).loss.backward()
            optimizer.step()
            seen.check(step, stage="train")  # decide on this step's recording
    for event in seen.events:
        print(event.describe())
    after = model.get_submodule(SUPER_WEIGHT[0]).weight.detach()
    return {"watch": seen, "before": before, "after": after}


if __name__ == "__main__":
    main()
