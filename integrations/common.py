"""What the recipes share: the model, its verified super weight, and short chunks of real text."""

from __future__ import annotations

import torch

from sw_hooks.models import calibration_text, load_model, tokenize

# SmolLM2-135M's verified super weight, relative to the Hugging Face model.
SUPER_WEIGHT = ("model.layers.11.mlp.down_proj", 507, 1229)


def model_and_tokenizer(model=None, tokenizer=None):
    """The given pair, or the embedded SmolLM2-135M loaded fresh."""
    return (model, tokenizer) if model is not None else load_model()


def chunks(tokenizer, count: int = 4, length: int = 64) -> torch.Tensor:
    """``[count, length]`` token ids of real English prose, each chunk starting with BOS."""
    ids = tokenize(tokenizer, calibration_text()[:40_000], max_tokens=count * (length - 1))[0]
    bos = torch.full((count, 1), tokenizer.bos_token_id or 0, dtype=torch.long)
    return torch.cat([bos, ids.view(count, length - 1)], dim=1)
